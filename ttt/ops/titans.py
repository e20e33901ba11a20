"""Titans' neural memory (Behrouz et al. 2024, arXiv 2501.00663 §3.1–3.2): test-time gradient
descent with per-token momentum and forgetting, for any inner learner f(x; W).

Per sequence and head the state is the memory W (a learner's weight pytree) and its momentum S
(shaped like W). Token t, with per-token rates θ_t (learning rate), η_t (momentum) and α_t
(forgetting), all in [0, 1] for the layer but any reals here:
    u_t = ∇_W ℓ(W_{t'}; k_t, v_t),   ℓ(W; k, v) = ½‖f(k; W) − v‖²
    S_t = η_t S_{t−1} − θ_t u_t                   (Titans Eq. 14, the "surprise" with momentum)
    W_t = (1 − α_t) W_{t−1} + S_t                 (Eq. 13, forgetting)
    z_t = f(q_t; W_t)                             (update, then read)
t' is the start of t's chunk (mini-batch) of b tokens: every gradient inside a chunk is taken at
the weights the previous chunk ended with (Eq. 16–18). b = 1 is the exact token recurrence
(W_{t'} = W_{t−1}).

Conventions, against the paper: its loss is ‖f(k) − v‖² (so its θ is half of ours); it reads the
updated memory, y_t = M_t(q_t), as here and as TTT-LM (`ttt.ops.ttt`) and the delta rule
(`ttt.ops.delta`). With η = α = 0 this is mini-batch TTT-GD with η_ij = θ_j (`ttt_primal`).
With a linear bias-free learner, b = 1, η = 0 and α_t = 1 − a_t it is NOT the gated delta rule:
there S_t = a_t S_{t−1} + β_t k_t (v_t − a_t S_{t−1}ᵀ k_t)ᵀ (the gradient taken at the decayed
state), here W_t = a_t W_{t−1} + θ_t k_t (v_t − W_{t−1}ᵀ k_t)ᵀ. From the same state and with
β = θ, W_t − S_t = −θ_t (1 − a_t) k_t k_tᵀ W_{t−1}; without the gate (a = 1) they agree
(tests/test_titans.py holds both).

The chunk form (`forward`). Inside a chunk from (W_0, S_0), tokens i = 1..b, let
    E_ij = Π_{j<s≤i} η_s,  e_i = Π_{s≤i} η_s,  D_ij = Π_{j<s≤i} (1 − α_s),  γ_i = Π_{s≤i} (1 − α_s)
(j ≤ i; the lower-triangular matrices have ones on the diagonal). The two linear recurrences
unroll to
    S_i = e_i S_0 − Σ_{j≤i} E_ij θ_j u_j,
    W_i = γ_i W_0 + Σ_{l≤i} D_il S_l = γ_i W_0 + m_i S_0 − Σ_{j≤i} Ω_ij θ_j u_j,
with m = D e and Ω = D E (b × b, one small matmul per chunk). So a chunk is TTT's step
(`ttt.ops.ttt`) with the learning-rate matrix Ω diag(θ) plus the decayed start terms, in two
forms: the primal one takes the u_j by one vmap(grad) at W_0, materialises every W_i and answers
z_i = f(q_i; W_i) (any learner); the dual one (a dense-chain learner with the squared loss;
docs/design.md §15.5) writes u_j = X_jᵀ G_j per dense layer and answers without any W_i, as TTT's
dual form. A `lax.scan` over chunks carries (W, S) from the chunk's last real token.

- `forward`: the chunk form above (form "dual" | "primal" | "auto"). `naive`: the token
  recurrence as a Python loop (tests only).
- `step` / `prefill` / `init_state`: decoding. The state is `TitansState(W, S, W_start, pos)`:
  W_start is the open chunk's starting memory, where its gradients are taken.

Notable choices:
- The products E, D come from `jnp.cumprod` of masked (b, b) matrices, not exp(cumsum(log)):
  η = 0 (no momentum) and α = 1 (forget everything) are exact, and their gradients finite.
- A final partial chunk is zero-padded; the carried state is read at the chunk's last real row
  (a padded token would still add S to W), and chunks with no real token (`scan_groups`' remat
  padding) keep the carry.
- The carried state keeps W0's dtype.
- `max_grad_norm` (off by default; not in the paper) cuts each token's gradient to a length τ
  before the momentum takes it: a step of the memory is then at most θ_t τ, whatever the
  memory's curvature (`clipped`). In the dual form ‖u_j‖² = Σ_l ‖X_lj‖² ‖G_lj‖² (+ ‖G_lj‖² per
  bias): u_j is rank one per dense layer, so the norm needs no W_i either.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ttt.ops import _dual, checks
from ttt.ops._scan import from_minibatches, num_minibatches, scan_minibatches, to_minibatches
from ttt.ops.learners import reconstruction_loss

FORMS = ("auto", "dual", "primal")


class TitansState(NamedTuple):
    """Decode state (leaves lead with (B, H)): the memory W, its momentum S, the open chunk's
    starting memory W_start (where its gradients are taken) and pos (int32, tokens read)."""

    W: Any
    S: Any
    W_start: Any
    pos: jax.Array


def _per_sequence(learner, W, q, what):
    """W with leading (B, H): broadcast from (H, ...) if needed (checked against the learner)."""
    B, H, _, d_in = q.shape
    if checks.inner_state_layout(learner, W, B, H, d_in, what):
        return W
    return jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W)


def check_max_grad_norm(max_grad_norm):
    """None or a positive number (the op's and the layer's check)."""
    if max_grad_norm is not None and not (isinstance(max_grad_norm, int | float)
                                          and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm: expected None or a positive number, "
                         f"got {max_grad_norm!r}")


def _check(q, k, v, theta, eta, alpha, mini_batch, max_grad_norm=None):
    checks.check_int("mini_batch", mini_batch, 1)
    check_max_grad_norm(max_grad_norm)
    checks.check_qkv(q, k, v)
    B, H, N, _ = q.shape
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        checks.check_shape(name, x, (B, H, N), "(B, H, N)", like="q")
        checks.check_floating(name, x)


def _start(learner, W0, S0, q):
    """(W0, S0) with leading (B, H); S0 None is zeros."""
    W = _per_sequence(learner, W0, q, "W0")
    if S0 is None:
        return W, jax.tree_util.tree_map(jnp.zeros_like, W)
    return W, jax.tree_util.tree_map(lambda s, w: s.astype(w.dtype),
                                     _per_sequence(learner, S0, q, "S0"), W)


def products(x):
    """x (..., b) -> (P (..., b, b), p (..., b)): P_ij = Π_{j<s≤i} x_s for j ≤ i (ones on the
    diagonal, zeros above it), p_i = Π_{s≤i} x_s. Products only (no logs): zeros are exact."""
    b = x.shape[-1]
    later = jnp.arange(b)[:, None] > jnp.arange(b)[None, :]  # (b, b): s > j
    factors = jnp.where(later, x[..., :, None], jnp.ones((), x.dtype))  # (..., s, j)
    P = jnp.cumprod(factors, axis=-2)  # (..., i, j): Π_{s≤i, s>j} x_s
    return jnp.where(jnp.tril(jnp.ones((b, b), bool)), P, 0.0), jnp.cumprod(x, axis=-1)


def _coefficients(th, et, al):
    """A chunk's rates (b,) each -> (E (b, b), e (b,), γ (b,), Ω diag(θ) (b, b), m = D e (b,))."""
    E, e = products(et)
    D, gam = products(1.0 - al)
    return E, e, gam, (D @ E) * th[None, :], D @ e


def clipped(theta, sq_norm, max_grad_norm):
    """θ_j min(1, τ / ‖u_j‖) from ‖u_j‖² (same shape as θ): the step of a token whose gradient
    is longer than τ = max_grad_norm is cut to τ's length (None: θ unchanged). Written as
    τ / sqrt(max(‖u‖², τ²)), so a zero gradient has a finite derivative."""
    if max_grad_norm is None:
        return theta
    tau = jnp.asarray(max_grad_norm, sq_norm.dtype)
    return theta * (tau / jnp.sqrt(jnp.maximum(sq_norm, tau * tau))).astype(theta.dtype)


def _sq_norm(u, lead):
    """Σ over a pytree's leaves of the squares past the first `lead` axes."""
    return sum(jnp.sum(jnp.square(x), axis=tuple(range(lead, x.ndim)))
               for x in jax.tree_util.tree_leaves(u))


def _primal_chunk(learner, fixed, W, S, q_b, k_b, v_b, th, et, al, n, max_grad_norm=None):
    """One chunk from (W, S) by the definition: the u_j by vmap(grad) at W, every W_i
    materialised, z_i = f(q_i; W_i). Returns (z (b, d_out), W_n, S_n) at the last real row."""
    loss = lambda W_, f, kj, vj: reconstruction_loss(learner, W_, f, kj, vj)
    u = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))(W, fixed, k_b, v_b)  # (b, ...)
    th = clipped(th, _sq_norm(u, 1), max_grad_norm)
    E, e, gam, Om, m = _coefficients(th, et, al)
    rows = lambda c, x: jnp.einsum("i,...->i...", c, x)  # c_i x for every row i
    W_rows = jax.tree_util.tree_map(
        lambda w, s, u_l: rows(gam, w) + rows(m, s) - jnp.einsum("ij,j...->i...", Om, u_l),
        W, S, u)  # leaves (b, ...): W_i
    z = jax.vmap(learner.apply, in_axes=(0, 0, None))(W_rows, q_b, fixed)  # (b, d_out)
    last = jnp.maximum(n - 1, 0)
    coef = E[last] * th  # (b,): E_nj θ_j
    W_n = jax.tree_util.tree_map(lambda r, w: r[last].astype(w.dtype), W_rows, W)
    S_n = jax.tree_util.tree_map(
        lambda s, u_l: (e[last] * s - jnp.einsum("j,j...->...", coef, u_l)).astype(s.dtype),
        S, u)
    return z, W_n, S_n


def _dual_chunk(learner, fixed, W, S, q_b, k_b, v_b, th, et, al, n, max_grad_norm=None):
    """The same chunk in the dual form (module docstring): per dense layer, with key inputs X^k,
    pre-activation gradients G at W (u_j = X^k_jᵀ G_j) and A = Ω diag(θ) ⊙ (X^q X^kᵀ),
        Z(q) = γ ⊙ (X^q W + b) + m ⊙ (X^q S + s) − A G − Ω diag(θ) G (bias),
    and the carried (W_n, S_n) as sums of the rank-one u_j weighted by rows of Ω diag(θ) and E
    diag(θ). No W_i is materialised; G is written out (`_dual.key_gradients`), not autodiffed."""
    dense = learner.dense
    w1, b1 = dense[0]
    Z1k = k_b @ W[w1]  # (b, d_in) @ (d_in, d_1)
    if b1 is not None:
        Z1k = Z1k + W[b1]
    G, Xk = _dual.key_gradients(learner, W, fixed, k_b, v_b, Z1k)
    X_keys = (k_b, *Xk)  # every dense layer's key inputs (b, d_l)
    if max_grad_norm is not None:  # ‖u_j‖² = Σ_l ‖X_lj‖² ‖G_lj‖² (+ ‖G_lj‖² for a bias)
        sq = lambda a: jnp.sum(a * a, axis=-1)
        th = clipped(th, sum(sq(G_l) * (sq(X_l) + (b_name is not None))
                             for X_l, G_l, (_, b_name) in zip(X_keys, G, dense, strict=True)),
                     max_grad_norm)
    E, e, gam, Om, m = _coefficients(th, et, al)
    A1 = Om * (q_b @ k_b.T)  # (b, d_in) @ (d_in, b) -> (b, b)
    if b1 is not None:
        A1 = A1 + Om

    def base(l, X):  # γ ⊙ (X W + b) + m ⊙ (X S + s) at layer l's query inputs X (b, d_l)
        w_name, b_name = dense[l]
        start, mom = X @ W[w_name], X @ S[w_name]  # (b, d_l) @ (d_l, d_{l+1})
        if b_name is not None:
            start, mom = start + W[b_name], mom + S[b_name]
        return _dual.rows(gam, start) + _dual.rows(m, mom)

    z = _dual.query_side(learner, W, fixed, q_b, Om, A1, G, Xk, base=base)

    def summed(coef):  # Σ_j coef_j u_j per dense layer, u_j = X_jᵀ G_j (and G_j for a bias)
        out = {}
        for X_l, G_l, (w_name, b_name) in zip(X_keys, G, dense, strict=True):
            out[w_name] = X_l.T @ _dual.rows(coef, G_l)  # (d_l, b) @ (b, d_{l+1})
            if b_name is not None:
                out[b_name] = coef @ G_l  # (b,) @ (b, d_{l+1})
        return out

    last = jnp.maximum(n - 1, 0)
    tree = jax.tree_util.tree_map
    W_n = tree(lambda w, s, u: (gam[last] * w + m[last] * s - u).astype(w.dtype),
               W, S, summed(Om[last]))
    S_n = tree(lambda s, u: (e[last] * s - u).astype(s.dtype), S, summed(E[last] * th))
    return z, W_n, S_n


def _run(learner, W0, S0, q, k, v, theta, eta, alpha, *, mini_batch, fixed, remat_every, unroll,
         form, max_grad_norm):
    """The chunk form: (z (B, H, N, d_out), W_N, S_N), states leading (B, H)."""
    _check(q, k, v, theta, eta, alpha, mini_batch, max_grad_norm)
    checks.check_choice("form", form, FORMS)
    dual_ok = learner.dense is not None and learner.loss is None
    if form == "dual" and not dual_ok:
        raise ValueError(f"form='dual': learner {learner.name!r} has no dense chain with the "
                         "squared loss; use form='primal' or 'auto'")
    form_is_dual = form == "dual" or (form == "auto" and dual_ok)
    chunk = _dual_chunk if form_is_dual else _primal_chunk
    B, H, N, _ = q.shape
    b = mini_batch
    M = num_minibatches(N, b)
    W0, S0 = _start(learner, W0, S0, q)
    rates = jnp.stack([theta, eta, alpha], axis=-1).astype(q.dtype)  # (B, H, N, 3)
    real = jnp.clip(N - b * jnp.arange(M), 0, b).astype(jnp.int32)  # (M,) real tokens per chunk

    def head(W_h, S_h, fixed_h, xs_h):
        def step(carry, x):
            q_b, k_b, v_b, r_b, n = x  # (b, d), (b, d), (b, e), (b, 3), ()
            z, W_n, S_n = chunk(learner, fixed_h, *carry, q_b, k_b, v_b,
                                r_b[:, 0], r_b[:, 1], r_b[:, 2], n, max_grad_norm)
            keep = lambda new, old: jax.tree_util.tree_map(
                lambda a_, b_: jnp.where(n > 0, a_, b_), new, old)
            return (keep(W_n, carry[0]), keep(S_n, carry[1])), z

        # the backward recomputes a chunk from its carried state (fewer stacked residuals)
        step = jax.checkpoint(step, prevent_cse=False) if form_is_dual else step
        return scan_minibatches(step, (W_h, S_h), xs_h, remat_every, unroll)

    over_h = jax.vmap(head, in_axes=(0, 0, 0, (0, 0, 0, 0, None)))
    over_b = jax.vmap(over_h, in_axes=(0, 0, None, (0, 0, 0, 0, None)))
    xs = (to_minibatches(q, b), to_minibatches(k, b), to_minibatches(v, b),
          to_minibatches(rates, b), real)
    (W_N, S_N), z = over_b(W0, S0, fixed, xs)  # z (B, H, M, b, d_out)
    return from_minibatches(z, N), W_N, S_N


def forward(learner, W0, q, k, v, theta, eta, alpha, *, mini_batch=16, fixed=None, S0=None,
            remat_every=0, unroll=1, form="auto", max_grad_norm=None):
    """Titans' memory over a sequence in chunks of `mini_batch` (module docstring).

    q, k (B, H, N, d_in); v (B, H, N, d_out); theta, eta, alpha (B, H, N); W0 (and S0, the
    initial momentum, None = zeros) pytrees leading H or (B, H); fixed leading H or None.
    remat_every, unroll as `ttt.ops.ttt.ttt_primal`. N need not be a multiple of mini_batch.
    form: "dual" (no W_i materialised; a learner with a dense chain and the squared loss),
    "primal" (the definition, any learner) or "auto" (dual where it applies).
    max_grad_norm: None, or τ > 0: every token's gradient u_j (all of the memory's weights) is
    cut to length τ before it enters the momentum (θ_j ← θ_j min(1, τ / ‖u_j‖), `clipped`).
    Returns (z (B, H, N, d_out), W_N, S_N), the states leading (B, H).
    """
    return _run(learner, W0, S0, q, k, v, theta, eta, alpha, mini_batch=mini_batch, fixed=fixed,
                remat_every=remat_every, unroll=unroll, form=form, max_grad_norm=max_grad_norm)


@functools.cache
def _per_token(learner):
    """Jitted (∇ℓ, f) of one token for every (B, H), compiled once per learner (`naive`)."""
    per_bh = lambda fn: jax.jit(jax.vmap(jax.vmap(fn)))
    grad = per_bh(jax.grad(lambda W_, f, kj, vj: reconstruction_loss(learner, W_, f, kj, vj)))
    return grad, per_bh(learner.apply)


def naive(learner, W0, q, k, v, theta, eta, alpha, *, mini_batch=16, fixed=None, S0=None,
          max_grad_norm=None):
    """The token recurrence as a Python loop (tests only): same contract and results as
    `forward`, every W_t and S_t computed one token after another."""
    _check(q, k, v, theta, eta, alpha, mini_batch, max_grad_norm)
    B, H, N, _ = q.shape
    W, S = _start(learner, W0, S0, q)
    fix = jax.tree_util.tree_map(lambda f: jnp.broadcast_to(f, (B, *f.shape)), fixed)
    grad, answer = _per_token(learner)
    scale = lambda c, x: jnp.einsum("bh,bh...->bh...", c, x)  # per (B, H) rate
    zs = []
    for t in range(N):
        if t % mini_batch == 0:
            W_start = W
        u = grad(W_start, fix, k[:, :, t], v[:, :, t])
        th = clipped(theta[:, :, t], _sq_norm(u, 2), max_grad_norm)
        S = jax.tree_util.tree_map(lambda s, u_l: scale(eta[:, :, t], s) - scale(th, u_l), S, u)
        W = jax.tree_util.tree_map(lambda w, s: scale(1.0 - alpha[:, :, t], w) + s, W, S)
        zs.append(answer(W, q[:, :, t], fix))
    return jnp.stack(zs, axis=2), W, S


# ----------------------------------------------------------------------------- decoding


def init_state(W0, batch: int) -> TitansState:
    """The state before the first token: W0 (leading H) per sequence, S = 0, W_start = W0."""
    W = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch, *jnp.shape(w))), W0)
    return TitansState(W, jax.tree_util.tree_map(jnp.zeros_like, W), W,
                       jnp.zeros((), jnp.int32))


def step(learner, state: TitansState, q_t, k_t, v_t, theta_t, eta_t, alpha_t, *, mini_batch=16,
         fixed=None, max_grad_norm=None):
    """One token: q_t, k_t (B, H, d_in); v_t (B, H, d_out); theta_t, eta_t, alpha_t (B, H)
    -> (z_t (B, H, d_out), next TitansState). Matches `forward` token for token."""
    checks.check_int("mini_batch", mini_batch, 1)
    check_max_grad_norm(max_grad_norm)
    checks.check_rank("q_t", q_t, 3, "(B, H, d_in)")
    B, H, _ = q_t.shape
    checks.check_leading("state.W", state.W, (B, H), "(B, H)")
    for name, x in (("theta_t", theta_t), ("eta_t", eta_t), ("alpha_t", alpha_t)):
        checks.check_shape(name, x, (B, H), "(B, H)", like="q_t")
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    close = state.pos % mini_batch == mini_batch - 1

    def head(W, S, W_start, f, q1, k1, v1, th, et, al):
        u = jax.grad(loss)(W_start, f, k1, v1)
        th = clipped(th, _sq_norm(u, 0), max_grad_norm)
        S = jax.tree_util.tree_map(lambda s, u_l: (et * s - th * u_l).astype(s.dtype), S, u)
        W = jax.tree_util.tree_map(lambda w, s: ((1.0 - al) * w + s).astype(w.dtype), W, S)
        W_start = jax.tree_util.tree_map(lambda w, w0: jnp.where(close, w, w0), W, W_start)
        return learner.apply(W, q1, f), (W, S, W_start)

    over_h = jax.vmap(head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0, 0))
    over_b = jax.vmap(over_h, in_axes=(0, 0, 0, None, 0, 0, 0, 0, 0, 0))
    rates = (x.astype(q_t.dtype) for x in (theta_t, eta_t, alpha_t))
    z_t, (W, S, W_start) = over_b(state.W, state.S, state.W_start, fixed, q_t, k_t, v_t, *rates)
    return z_t, TitansState(W, S, W_start, state.pos + 1)


def prefill(learner, W0, q, k, v, theta, eta, alpha, *, mini_batch=16, fixed=None,
            remat_every=0, unroll=1, max_grad_norm=None):
    """Read a prompt: (z (B, H, N, d_out), TitansState after N tokens). The whole chunks through
    `forward`, then the open partial chunk (if any) through `forward` from the state they leave,
    which is also the open chunk's W_start."""
    N = q.shape[2]
    n_full = (N // mini_batch) * mini_batch
    kw = dict(mini_batch=mini_batch, fixed=fixed, remat_every=remat_every, unroll=unroll,
              max_grad_norm=max_grad_norm)
    zs, W, S = [], W0, None
    for part in (slice(0, n_full), slice(n_full, N)):
        if part.stop > part.start:
            W_start = W  # the start of the last part (the open chunk when there is one)
            xs = (x[:, :, part] for x in (q, k, v, theta, eta, alpha))
            z, W, S = forward(learner, W, *xs, S0=S, **kw)
            zs.append(z)
    if N == n_full:
        W_start = W
    state = TitansState(W, S, _per_sequence(learner, W_start, q, "W0"), jnp.asarray(N, jnp.int32))
    return jnp.concatenate(zs, axis=2), state


__all__ = ["TitansState", "check_max_grad_norm", "clipped", "forward", "init_state", "naive",
           "prefill", "products", "step"]
