"""The (gated) delta rule, as pure functions on per-head arrays (B, H, N, d).

Per sequence and head the state is a matrix S (dk, dv). With a_t = exp(log_alpha_t) (a_t = 1
without a gate) every token first updates, then reads:
    S_t = a_t S_{t−1} + β_t k_t (v_t − a_t S_{t−1}ᵀ k_t)ᵀ,    o_t = S_tᵀ q_t.
Without a gate this is one gradient step of rate β_t on ½‖Sᵀk_t − v_t‖² (causal TTT with a
bias-free linear inner learner and mini-batch 1); the gate decays S before the step. No scaling
of q and no normalisation of k happen here: the caller does that.

- `delta_rule`: the fast form, exact; chunks of c tokens, a `lax.scan` over chunks carries S.
- `delta_rule_recurrent`: the recurrence above token by token (`lax.scan`), the reference.
- `delta_rule_decode_step`: one token of the recurrence (generation).

The chunk form (WY/UT representation). Inside a chunk from state S_0, let g_i = Σ_{s≤i} log a_s
(cumulative log-decay, inclusive, counted from the chunk start), γ_i = exp(g_i) and
Γ_ij = exp(g_i − g_j) (j ≤ i). Write the update as S_i = a_i S_{i−1} + k_i u_iᵀ with the new
values u_i = β_i (v_i − a_i S_{i−1}ᵀ k_i). Unrolling,
    S_i = γ_i S_0 + Σ_{j≤i} Γ_ij k_j u_jᵀ,   so   a_i S_{i−1} = S_i − k_i u_iᵀ
        = γ_i S_0 + Σ_{j<i} Γ_ij k_j u_jᵀ,
and substituting into u_i gives u_i + β_i Σ_{j<i} Γ_ij (k_i·k_j) u_j = β_i (v_i − γ_i S_0ᵀ k_i).
For the chunk's K (c, dk), V (c, dv), β (c,) that is one unit-lower-triangular system
    (I + A) U = diag(β) (V − diag(γ) K S_0),   A = tril(diag(β) (K Kᵀ ⊙ Γ), −1),
With T = (I + A)⁻¹ (`unit_lower_inverse`) that is U = U_0 − W S_0, where
    U_0 = T diag(β) V,   W = T diag(β γ) K        (neither depends on S_0), and then
    O   = diag(γ) Q S_0 + ((Q Kᵀ) ⊙ Γ ⊙ M) U        (M: causal mask, diagonal included),
    S_c = γ_c S_0 + (diag(Γ_cj) K)ᵀ U                 (the state carried to the next chunk).
Everything that does not need S_0 (A, T, W, U_0, Q Kᵀ) is computed for all chunks at once; the
`lax.scan` over chunks carries S with two small matmuls per chunk (U, then S_c) and hands back
each chunk's S_0 and U, from which all outputs O come in one batched product after the scan.

Notable choices:
- No gate (log_alpha None): Γ is the causal mask and γ = 1; the decay factors are skipped.
- Γ is formed as exp of the masked difference g_i − g_j (zero above the diagonal before the exp):
  no overflow and no NaN gradients from the entries the mask discards.
- N need not be a multiple of c: the tail is padded with β = 0, log_alpha = 0 tokens, which leave
  S unchanged (u = 0, a = 1); their outputs are cut.
- The chunk math runs in q's dtype; the carried state keeps the dtype of the initial state
  (zeros in q's dtype by default).
- log_alpha ≤ 0 is checked only on concrete arrays (not under jit/grad tracing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt.ops import checks
from ttt.ops.primitives import scale_rows


def _check_sequence(q, k, v, beta, log_alpha, state):
    """q, k (B, H, N, dk); v (B, H, N, dv); beta, log_alpha (B, H, N); state (B, H, dk, dv)."""
    checks.check_qkv(q, k, v, "dk", "dv")
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        checks.check_floating(name, x)
    checks.check_same_dtype(q=q, k=k, v=v)
    B, H, N, dk = q.shape
    dv = v.shape[-1]
    checks.check_shape("beta", beta, (B, H, N), "(B, H, N)", like="q")
    if log_alpha is not None:
        checks.check_shape("log_alpha", log_alpha, (B, H, N), "(B, H, N)", like="q")
        checks.check_floating("log_alpha", log_alpha)
        checks.check_log_decay("log_alpha", log_alpha)
    if state is not None:
        checks.check_shape("state", state, (B, H, dk, dv), "(B, H, dk, dv)", like="q, v")
        checks.check_floating("state", state)


def _defaults(q, v, beta, log_alpha, state):
    """Fill in log_alpha = 0 (no gate) and state = 0; cast beta and log_alpha to q's dtype."""
    B, H, N, dk = q.shape
    if log_alpha is None:
        log_alpha = jnp.zeros((B, H, N), q.dtype)
    if state is None:
        state = jnp.zeros((B, H, dk, v.shape[-1]), q.dtype)
    return beta.astype(q.dtype), log_alpha.astype(q.dtype), state


# ----------------------------------------------------------------------------- recurrent form


def _token_step(S, q_t, k_t, v_t, beta_t, log_alpha_t):
    """One token of the recurrence for (B, H): S (B, H, dk, dv); q_t, k_t (B, H, dk); v_t (B, H,
    dv); beta_t, log_alpha_t (B, H) -> (o_t (B, H, dv), S_t)."""
    a = jnp.exp(log_alpha_t)[..., None, None]  # (B, H, 1, 1)
    S_dec = a * S  # (B, H, dk, dv)
    pred = jnp.einsum("bhkv,bhk->bhv", S_dec, k_t)  # (B, H, dv): a_t S_{t−1}ᵀ k_t
    u = beta_t[..., None] * (v_t - pred)  # (B, H, dv)
    S_new = (S_dec + jnp.einsum("bhk,bhv->bhkv", k_t, u)).astype(S.dtype)  # (B, H, dk, dv)
    return jnp.einsum("bhkv,bhk->bhv", S_new, q_t), S_new


@jax.jit
def _recurrent(q, k, v, beta, log_alpha, S0):
    major = lambda x: jnp.moveaxis(x, 2, 0)  # (B, H, N, ...) -> (N, B, H, ...): scan order

    def step(S, x):
        o_t, S = _token_step(S, *x)
        return S, o_t

    S_N, o = jax.lax.scan(step, S0, tuple(map(major, (q, k, v, beta, log_alpha))))
    return jnp.moveaxis(o, 0, 2), S_N  # o (B, H, N, dv)


def delta_rule_recurrent(q, k, v, beta, *, log_alpha=None, state=None):
    """The delta rule token by token (the reference). Shapes and results as `delta_rule`."""
    _check_sequence(q, k, v, beta, log_alpha, state)
    return _recurrent(q, k, v, *_defaults(q, v, beta, log_alpha, state))


def delta_rule_decode_step(S, q_t, k_t, v_t, beta_t, log_alpha_t=None):
    """One token: S (B, H, dk, dv); q_t, k_t (B, H, dk); v_t (B, H, dv); beta_t, log_alpha_t
    (B, H) or None (no gate) -> (o_t (B, H, dv), S_new (B, H, dk, dv)). Matches `delta_rule`."""
    checks.check_rank("q_t", q_t, 3, "(B, H, dk)")
    B, H, dk = q_t.shape
    checks.check_shape("k_t", k_t, (B, H, dk), "(B, H, dk)", like="q_t")
    checks.check_rank("v_t", v_t, 3, "(B, H, dv)")
    checks.check_shape("v_t", v_t, (B, H, None), "(B, H, dv)", like="q_t")
    checks.check_shape("S", S, (B, H, dk, v_t.shape[-1]), "(B, H, dk, dv)", like="q_t, v_t")
    checks.check_shape("beta_t", beta_t, (B, H), "(B, H)", like="q_t")
    for name, x in (("S", S), ("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("beta_t", beta_t)):
        checks.check_floating(name, x)
    if log_alpha_t is None:
        log_alpha_t = jnp.zeros((B, H), q_t.dtype)
    else:
        checks.check_shape("log_alpha_t", log_alpha_t, (B, H), "(B, H)", like="q_t")
        checks.check_log_decay("log_alpha_t", log_alpha_t)
    return _token_step(S, q_t, k_t, v_t, beta_t.astype(q_t.dtype), log_alpha_t.astype(q_t.dtype))


# ----------------------------------------------------------------------------- chunked form


@jax.custom_vjp
def unit_lower_inverse(A):
    """T = (I + A)⁻¹ for strictly lower-triangular A (..., c, c), by block doubling.

    Bottom-up over block sizes s = 1, 2, 4, …: the inverse of [[L11, 0], [L21, L22]] is
    [[T11, 0], [−T22 L21 T11, T22]], so each level is two batched matmuls on all diagonal blocks
    at once (A is zero-padded to the next power of two; the padding inverts to the identity).
    Exact forward substitution, written with matmuls only: XLA:CPU's batched triangular solve is
    slow and, inside a scan over chunks at N = 8192, stalled without finishing. The gradient
    uses dT = −T dA T: Ā = −Tᵀ T̄ Tᵀ, kept strictly lower.
    """
    return _inverse_fwd(A)[0]


def _inverse_fwd(A):
    c = A.shape[-1]
    P = 1 << max(c - 1, 0).bit_length()  # the next power of two >= c
    lead = A.shape[:-2]
    A = jnp.pad(A, [(0, 0)] * len(lead) + [(0, P - c), (0, P - c)])
    D = jnp.ones(lead + (P, 1, 1), A.dtype)  # the diagonal blocks of T, size s = 1
    s = 1
    while s < P:
        nb = P // (2 * s)  # pairs of blocks at this level
        blocks = jnp.diagonal(A.reshape(lead + (nb, 2 * s, nb, 2 * s)), axis1=-4, axis2=-2)
        A21 = jnp.moveaxis(blocks, -1, -3)[..., s:, :s]  # (..., nb, s, s)
        T11, T22 = D[..., 0::2, :, :], D[..., 1::2, :, :]
        top = jnp.concatenate([T11, jnp.zeros_like(T11)], -1)
        bottom = jnp.concatenate([-(T22 @ A21 @ T11), T22], -1)
        D = jnp.concatenate([top, bottom], -2)  # (..., nb, 2s, 2s)
        s *= 2
    T = D[..., 0, :c, :c]
    return T, T


def _inverse_bwd(T, T_bar):
    Tt = jnp.swapaxes(T, -1, -2)
    return (jnp.tril(-(Tt @ T_bar @ Tt), -1),)


unit_lower_inverse.defvjp(_inverse_fwd, _inverse_bwd)


@functools.partial(jax.jit, static_argnums=6)
def _chunked(q, k, v, beta, log_alpha, S0, chunk):
    """The chunk form; log_alpha None (no gate) skips the decay factors."""
    B, H, N, dk = q.shape
    c = chunk
    n = -(-N // c)
    pad = n * c - N

    def split(x):  # (B, H, N, ...) -> (B, H, n, c, ...), zero-padded (β = 0, log a = 0)
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return x.reshape(B, H, n, c, *x.shape[3:])

    q, k, v, beta = map(split, (q, k, v, beta))
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))  # j <= i
    # per-token factors as einsums: their gradients are then dots, not the reduces of a product
    # that XLA:CPU runs many times slower (`ttt.ops.primitives.scale_rows`)
    rows = scale_rows  # x (..., c, d) ⊙ s (..., c)
    kb, vb = rows(k, beta), rows(v, beta)
    if log_alpha is None:
        Gam = causal.astype(q.dtype)
        Kt, W_in, gq = k, kb, q
        decay = jnp.ones((B, H, n, 1, 1), q.dtype)
    else:
        g = jnp.cumsum(split(log_alpha), axis=-1)  # (B, H, n, c): log γ_i per chunk
        diff = jnp.where(causal, g[..., :, None] - g[..., None, :], 0.0)
        Gam = jnp.where(causal, jnp.exp(diff), 0.0)  # Γ_ij, zero above the diagonal
        gam = jnp.exp(g)  # (B, H, n, c): γ_i
        Kt = rows(k, jnp.exp(g[..., -1:] - g))  # (B, H, n, c, dk): Γ_cj k_j
        W_in, gq = rows(kb, gam), rows(q, gam)
        decay = jnp.exp(g[..., -1])[..., None, None]  # (B, H, n, 1, 1): γ_c
    T = unit_lower_inverse(jnp.tril(jnp.einsum("...id,...jd->...ij", kb, k) * Gam, -1))
    W = T @ W_in  # (B, H, n, c, dk):  U = U0 − W S_0
    U0 = T @ vb  # (B, H, n, c, dv)

    def step(S, x):  # S: the state before this chunk
        W_i, U0_i, Kt_i, decay_i = x
        S_in = S.astype(q.dtype)
        U = U0_i - W_i @ S_in  # (B, H, c, dv)
        S_out = decay_i * S_in + jnp.swapaxes(Kt_i, -1, -2) @ U
        return S_out.astype(S.dtype), (S_in, U)

    major = lambda x: jnp.moveaxis(x, 2, 0)  # chunk axis first: scan order
    S_N, (S_in, U) = jax.lax.scan(step, S0, tuple(map(major, (W, U0, Kt, decay))))
    S_in, U = jnp.moveaxis(S_in, 0, 2), jnp.moveaxis(U, 0, 2)  # (B, H, n, ·, dv)
    qk = jnp.einsum("...id,...jd->...ij", q, k) * Gam  # causal, diagonal included
    O = gq @ S_in + qk @ U  # (B, H, n, c, dv)
    return O.reshape(B, H, n * c, -1)[:, :, :N], S_N


def delta_rule(q, k, v, beta, *, log_alpha=None, chunk: int = 64, state=None):
    """The (gated) delta rule in chunks of `chunk` tokens (exact; see the module docstring).

    q, k: (B, H, N, dk); v: (B, H, N, dv); beta: (B, H, N) write strengths; log_alpha: (B, H, N)
    log-decays ≤ 0, or None (no gate); state: (B, H, dk, dv) initial S, or None (zeros).
    Returns (o (B, H, N, dv), S_N (B, H, dk, dv)). N need not be a multiple of `chunk`.
    """
    _check_sequence(q, k, v, beta, log_alpha, state)
    checks.check_int("chunk", chunk, 1)
    beta, _, state = _defaults(q, v, beta, None, state)
    log_alpha = None if log_alpha is None else log_alpha.astype(q.dtype)
    return _chunked(q, k, v, beta, log_alpha, state, chunk)


__all__ = ["delta_rule", "delta_rule_decode_step", "delta_rule_recurrent", "unit_lower_inverse"]
