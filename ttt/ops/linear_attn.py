"""Linear attention, as pure functions on per-head arrays (B, H, N, d).

- `linear_attention`: z_t = Σ_{s≤t} v_s (φ(k_s)·φ(q_t)) [/ normaliser], in three forms that must
  agree: "quadratic" (masked N×N, the reference), "cumsum" (cumulative outer-product states,
  O(N d dv) memory), and "chunked" (masked quadratic inside chunks of c tokens plus a state carried
  across chunks by `lax.scan`; the fast form). Non-causal uses one global state (design.md §7.1).
- `linear_attention_decode_step`: one token of the recurrent form, from
  `linear_attention_init_state`; a loop of it reproduces the causal forward.

The optional per-token decay gate (causal only; Mamba2's SSD core, the convention of
`ttt.ops.delta`): log_alpha (B, H, N) ≤ 0, a_t = exp(log_alpha_t), and
    S_t = a_t S_{t−1} + φ(k_t) v_tᵀ,   s_t = a_t s_{t−1} + φ(k_t),   z_t = S_tᵀ φ(q_t) [/ norm.].
With g_t = Σ_{s≤t} log a_s and Γ_ts = exp(g_t − g_s) (s ≤ t) that is the quadratic form with
scores φ(q)φ(k)ᵀ ⊙ Γ ⊙ causal. Γ is formed as exp of the masked difference (zero above the
diagonal before the exp): nothing overflows. "chunked" uses Γ inside a chunk and the chunk's
cumulative decay γ_i = exp(g_i) (from the chunk start) across chunks; "cumsum" becomes a token
`lax.scan` of the recurrence. log_alpha=None runs the ungated code unchanged; log_alpha ≤ 0 is
checked on concrete arrays only (not under jit/grad tracing).

Notable choices: the adaptive normaliser adds `eps` to the denominator (φ = identity can make it
vanish); "constant" divides by the number of tokens summed (t+1 causal, N non-causal), which is
what one full-batch GD step of TTT-Linear computes with the loss averaged over tokens; with a
gate "constant" still divides by t+1 (the count, not the decayed weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt.ops import checks
from ttt.ops.primitives import causal_mask

_FEATURE_MAPS = (None, "elu")
_NORMALIZERS = (None, "adaptive", "constant")
_FORMS = ("cumsum", "chunked", "quadratic")


def _feature(x, feature_map):
    """φ(x): identity, or elu(x) + 1 (positive features, Katharopoulos et al. 2020)."""
    return x if feature_map is None else jax.nn.elu(x) + 1.0


def _normalise(num, den, count, normalize, eps):
    """Normalise num (..., N, dv) by den (..., N) or by count (N,), the number of tokens summed."""
    if normalize == "adaptive":
        return num / (den + eps)[..., None]
    if normalize == "constant":
        return num / count[:, None].astype(num.dtype)
    return num


def _decay_matrix(log_alpha, mask):
    """Γ_ts = exp(g_t − g_s) for s ≤ t (0 elsewhere), g = cumsum(log_alpha) along the last axis.

    log_alpha (..., n), mask (n, n) causal -> (..., n, n). The difference is masked before the
    exp, so the discarded entries neither overflow nor give NaN gradients.
    """
    g = jnp.cumsum(log_alpha, axis=-1)
    diff = jnp.where(mask, g[..., :, None] - g[..., None, :], 0.0)
    return jnp.where(mask, jnp.exp(diff), 0.0)


def _linear_quadratic(fq, fk, v, causal, log_alpha=None):
    """Reference: A = φ(q) φ(k)ᵀ masked [⊙ Γ]; returns (A v, row sums of A), (B,H,N,dv), (B,H,N)."""
    scores = jnp.einsum("bhtd,bhsd->bhts", fq, fk)  # (B, H, N, N)
    if causal:
        scores = jnp.where(causal_mask(fq.shape[2]), scores, 0.0)
    if log_alpha is not None:  # causal only (checked by the caller)
        scores = scores * _decay_matrix(log_alpha, causal_mask(fq.shape[2]))  # (B, H, N, N)
    return jnp.einsum("bhts,bhsv->bhtv", scores, v), scores.sum(-1)


def _linear_cumsum(fq, fk, v):
    """Causal via cumulative states S_t = Σ_{s≤t} φ(k_s) v_sᵀ; memory O(N d dv)."""
    S = jnp.cumsum(jnp.einsum("bhsd,bhsv->bhsdv", fk, v), axis=2)  # (B, H, N, d, dv)
    s = jnp.cumsum(fk, axis=2)  # (B, H, N, d)
    num = jnp.einsum("bhtd,bhtdv->bhtv", fq, S)  # (B, H, N, dv)
    return num, jnp.einsum("bhtd,bhtd->bht", fq, s)


def _linear_scan(fq, fk, v, log_alpha):
    """Gated causal recurrence token by token (`lax.scan`): S_t = a_t S_{t−1} + φ(k_t) v_tᵀ."""
    B, H, N, d = fq.shape
    major = lambda x: jnp.moveaxis(x, 2, 0)  # (B, H, N, ...) -> (N, B, H, ...)

    def step(carry, xs):
        S, s = carry  # (B, H, d, dv), (B, H, d)
        q_t, k_t, v_t, la_t = xs  # (B, H, d), (B, H, d), (B, H, dv), (B, H)
        a = jnp.exp(la_t)  # (B, H)
        S = a[..., None, None] * S + jnp.einsum("bhd,bhv->bhdv", k_t, v_t)
        s = a[..., None] * s + k_t
        return (S, s), (jnp.einsum("bhd,bhdv->bhv", q_t, S), jnp.einsum("bhd,bhd->bh", q_t, s))

    init = (jnp.zeros((B, H, d, v.shape[-1]), fq.dtype), jnp.zeros((B, H, d), fq.dtype))
    _, (num, den) = jax.lax.scan(step, init, tuple(map(major, (fq, fk, v, log_alpha))))
    return jnp.moveaxis(num, 0, 2), jnp.moveaxis(den, 0, 2)  # (B, H, N, dv), (B, H, N)


def _linear_chunked_gated(fq, fk, v, log_alpha, chunk):
    """Gated causal in chunks of c: Γ inside a chunk, the chunk's decays γ across chunks.

    Inside a chunk from the carried (S_0, s_0), with g_i the cumulative log-decay from the chunk
    start and γ_i = exp(g_i): num_i = Σ_{j≤i} Γ_ij (q_i·k_j) v_j + γ_i q_i S_0, and the carried
    state becomes S_c = γ_c S_0 + Σ_j Γ_cj k_j v_jᵀ (s likewise). Padding has log a = 0, k = 0.
    """
    B, H, N, d = fq.shape
    dv = v.shape[-1]
    c = int(chunk)
    n_chunks = -(-N // c)
    pad = n_chunks * c - N

    def split(x):  # (B, H, N, ...) -> (n_chunks, B, H, c, ...), zero-padded
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return jnp.moveaxis(x.reshape(B, H, n_chunks, c, *x.shape[3:]), 2, 0)

    mask = causal_mask(c)

    def step(carry, xs):
        S, s = carry  # (B, H, d, dv), (B, H, d): everything before this chunk, decayed to it
        q_i, k_i, v_i, la_i = xs  # (B, H, c, d), (B, H, c, d), (B, H, c, dv), (B, H, c)
        g = jnp.cumsum(la_i, axis=-1)  # (B, H, c)
        gam = jnp.exp(g)[..., None]  # (B, H, c, 1): γ_i
        to_end = jnp.exp(g[..., -1:] - g)[..., None]  # (B, H, c, 1): Γ_cj
        scores = jnp.einsum("bhtd,bhsd->bhts", q_i, k_i) * _decay_matrix(la_i, mask)  # (B,H,c,c)
        num = jnp.einsum("bhts,bhsv->bhtv", scores, v_i)  # (B, H, c, dv) intra-chunk
        num = num + jnp.einsum("bhtd,bhdv->bhtv", gam * q_i, S)  # inter-chunk
        den = scores.sum(-1) + jnp.einsum("bhtd,bhd->bht", gam * q_i, s)  # (B, H, c)
        S = gam[..., -1, :, None] * S + jnp.einsum("bhsd,bhsv->bhdv", to_end * k_i, v_i)
        s = gam[..., -1, :] * s + (to_end * k_i).sum(axis=2)  # (B, H, d)
        return (S, s), (num, den)

    init = (jnp.zeros((B, H, d, dv), fq.dtype), jnp.zeros((B, H, d), fq.dtype))
    _, (num, den) = jax.lax.scan(step, init, tuple(map(split, (fq, fk, v, log_alpha))))
    num = jnp.moveaxis(num, 0, 2).reshape(B, H, n_chunks * c, dv)[:, :, :N]
    den = jnp.moveaxis(den, 0, 2).reshape(B, H, n_chunks * c)[:, :, :N]
    return num, den


def _linear_chunked(fq, fk, v, chunk):
    """Causal in chunks of c: intra-chunk masked quadratic + inter-chunk state carried by scan.

    N need not divide c: features are zero-padded *after* φ, so padded keys add nothing to any
    state and padded queries are sliced off.
    """
    B, H, N, d = fq.shape
    dv = v.shape[-1]
    c = int(chunk)
    n_chunks = -(-N // c)
    pad = n_chunks * c - N
    widths = ((0, 0), (0, 0), (0, pad), (0, 0))
    # (n_chunks, B, H, c, ·): chunk axis first for the scan
    split = lambda x: jnp.moveaxis(jnp.pad(x, widths).reshape(B, H, n_chunks, c, -1), 2, 0)
    fq_c, fk_c, v_c = split(fq), split(fk), split(v)
    mask = causal_mask(c)

    def step(carry, xs):
        S, s = carry  # (B, H, d, dv), (B, H, d): everything before this chunk
        q_i, k_i, v_i = xs  # (B, H, c, d), (B, H, c, d), (B, H, c, dv)
        scores = jnp.where(mask, jnp.einsum("bhtd,bhsd->bhts", q_i, k_i), 0.0)  # (B, H, c, c)
        num = jnp.einsum("bhts,bhsv->bhtv", scores, v_i)  # (B, H, c, dv) intra-chunk
        num = num + jnp.einsum("bhtd,bhdv->bhtv", q_i, S)  # (B, H, c, dv) inter-chunk
        den = scores.sum(-1) + jnp.einsum("bhtd,bhd->bht", q_i, s)  # (B, H, c)
        S = S + jnp.einsum("bhsd,bhsv->bhdv", k_i, v_i)  # (B, H, d, dv)
        s = s + k_i.sum(axis=2)  # (B, H, d)
        return (S, s), (num, den)

    init = (jnp.zeros((B, H, d, dv), fq.dtype), jnp.zeros((B, H, d), fq.dtype))
    _, (num, den) = jax.lax.scan(step, init, (fq_c, fk_c, v_c))
    # (n_chunks, B, H, c, ·) -> (B, H, N, ·)
    num = jnp.moveaxis(num, 0, 2).reshape(B, H, n_chunks * c, dv)[:, :, :N]
    den = jnp.moveaxis(den, 0, 2).reshape(B, H, n_chunks * c)[:, :, :N]
    return num, den


def linear_attention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    feature_map: str | None = None,
    normalize: str | None = None,
    form: str = "chunked",
    chunk: int = 64,
    eps: float = 1e-6,
    log_alpha=None,
) -> jax.Array:
    """Linear attention z_t = Σ_s v_s (φ(k_s)·φ(q_t)) [/ normaliser] (TTT-LM Theorem 1, E1/E3).

    q, k: (B, H, N, d); v: (B, H, N, dv) -> z (B, H, N, dv).
    causal: sum over s ≤ t; otherwise over all s with one global state S = Σ_s φ(k_s) v_sᵀ.
    feature_map: None (φ = identity) or "elu" (φ = elu + 1).
    normalize: None; "adaptive" divides by Σ_s φ(k_s)·φ(q_t) + eps; "constant" divides by the
      number of tokens summed (t + 1 causal, N non-causal).
    form (causal only; non-causal always uses the global state except "quadratic"): "quadratic"
      (masked N×N reference), "cumsum" (cumulative states), "chunked" (chunks of `chunk` tokens,
      N need not be a multiple).
    log_alpha: None (no gate) or (B, H, N) log-decays ≤ 0 (causal only): S_t = a_t S_{t−1} +
      φ(k_t) v_tᵀ with a_t = exp(log_alpha_t); the adaptive normaliser decays the same way.
    """
    checks.check_attention_qkv(q, k, v)
    checks.check_choice("feature_map", feature_map, _FEATURE_MAPS)
    checks.check_choice("normalize", normalize, _NORMALIZERS)
    checks.check_choice("form", form, _FORMS)
    if int(chunk) < 1:
        raise ValueError(f"chunk: expected a positive chunk size, got {chunk}")
    if log_alpha is None:
        return _linear_attention(q, k, v, causal, feature_map, normalize, form, int(chunk), eps)
    if not causal:
        raise ValueError("log_alpha: a decay gate needs causal=True (a decay needs an order)")
    B, H, N, _ = q.shape
    checks.check_shape("log_alpha", log_alpha, (B, H, N), "(B, H, N)", like="q")
    checks.check_floating("log_alpha", log_alpha)
    checks.check_log_decay("log_alpha", log_alpha)
    return _linear_attention_gated(
        q, k, v, log_alpha, feature_map, normalize, form, int(chunk), eps
    )


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _linear_attention_gated(q, k, v, log_alpha, feature_map, normalize, form, chunk, eps):
    N = q.shape[2]
    fq, fk = _feature(q, feature_map), _feature(k, feature_map)
    log_alpha = log_alpha.astype(fq.dtype)
    if form == "quadratic":
        num, den = _linear_quadratic(fq, fk, v, True, log_alpha)
    elif form == "cumsum":
        num, den = _linear_scan(fq, fk, v, log_alpha)
    else:
        num, den = _linear_chunked_gated(fq, fk, v, log_alpha, chunk)
    return _normalise(num, den, jnp.arange(1, N + 1), normalize, eps)


# jit so that eager calls reuse one compiled scan instead of retracing it on every call
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _linear_attention(q, k, v, causal, feature_map, normalize, form, chunk, eps):
    N = q.shape[2]
    fq, fk = _feature(q, feature_map), _feature(k, feature_map)
    if not causal and form != "quadratic":
        S = jnp.einsum("bhsd,bhsv->bhdv", fk, v)  # (B, H, d, dv)
        num = jnp.einsum("bhtd,bhdv->bhtv", fq, S)  # (B, H, N, dv)
        den = jnp.einsum("bhtd,bhd->bht", fq, fk.sum(axis=2))  # (B, H, N)
    elif form == "quadratic":
        num, den = _linear_quadratic(fq, fk, v, causal)
    elif form == "cumsum":
        num, den = _linear_cumsum(fq, fk, v)
    else:
        num, den = _linear_chunked(fq, fk, v, chunk)
    count = jnp.arange(1, N + 1) if causal else jnp.full((N,), N)
    return _normalise(num, den, count, normalize, eps)


def linear_attention_init_state(batch: int, heads: int, d: int, dv: int, dtype=jnp.float32):
    """Zero state {"S": (B, H, d, dv), "s": (B, H, d)} for `linear_attention_decode_step`."""
    return {"S": jnp.zeros((batch, heads, d, dv), dtype), "s": jnp.zeros((batch, heads, d), dtype)}


def linear_attention_decode_step(
    state,
    q_t,
    k_t,
    v_t,
    *,
    feature_map: str | None = None,
    normalize=False,
    position=None,
    eps: float = 1e-6,
    log_alpha_t=None,
):
    """One token of causal linear attention in recurrent form -> (z_t, state).

    state = {"S": (B, H, d, dv), "s": (B, H, d)} (sums over the tokens seen so far);
    q_t, k_t: (B, H, d); v_t: (B, H, dv) -> z_t (B, H, dv).
    S ← S + φ(k_t) v_tᵀ, s ← s + φ(k_t), z_t = φ(q_t) S [/ (φ(q_t)·s + eps)].
    normalize: False/None, True/"adaptive", or "constant" (divide by position + 1; `position` is
    the 0-based index of this token, required then). Matches `linear_attention(causal=True)`.
    log_alpha_t: None or (B, H) log-decays ≤ 0: S ← a S + φ(k_t) v_tᵀ, s ← a s + φ(k_t) with
    a = exp(log_alpha_t) (matches `linear_attention(..., log_alpha=...)`).
    """
    if normalize is True:
        normalize = "adaptive"
    elif normalize is False:
        normalize = None
    checks.check_choice("normalize", normalize, _NORMALIZERS)
    checks.check_choice("feature_map", feature_map, _FEATURE_MAPS)
    checks.check_rank("q_t", q_t, 3, "(B, H, d)")
    B, H, d = q_t.shape
    checks.check_shape("k_t", k_t, (B, H, d), "(B, H, d)", like="q_t")
    checks.check_rank("v_t", v_t, 3, "(B, H, dv)")
    checks.check_shape("v_t", v_t, (B, H, None), "(B, H, dv)", like="q_t")
    dv = v_t.shape[-1]
    if not isinstance(state, dict) or set(state) != {"S", "s"}:
        raise ValueError('state: expected a dict {"S": (B, H, d, dv), "s": (B, H, d)}')
    checks.check_shape('state["S"]', state["S"], (B, H, d, dv), "(B, H, d, dv)", like="q_t, v_t")
    checks.check_shape('state["s"]', state["s"], (B, H, d), "(B, H, d)", like="q_t")
    if normalize == "constant" and position is None:
        raise ValueError('position: required with normalize="constant" (0-based token index)')
    fq, fk = _feature(q_t, feature_map), _feature(k_t, feature_map)
    S, s = state["S"], state["s"]
    if log_alpha_t is not None:
        checks.check_shape("log_alpha_t", log_alpha_t, (B, H), "(B, H)", like="q_t")
        checks.check_floating("log_alpha_t", log_alpha_t)
        checks.check_log_decay("log_alpha_t", log_alpha_t)
        a = jnp.exp(log_alpha_t.astype(fq.dtype))  # (B, H)
        S, s = a[..., None, None] * S, a[..., None] * s
    S = S + jnp.einsum("bhd,bhv->bhdv", fk, v_t)  # (B, H, d, dv)
    s = s + fk  # (B, H, d)
    z = jnp.einsum("bhd,bhdv->bhv", fq, S)  # (B, H, dv)
    if normalize == "adaptive":
        z = z / (jnp.einsum("bhd,bhd->bh", fq, s) + eps)[..., None]
    elif normalize == "constant":
        z = z / (jnp.asarray(position) + 1).astype(z.dtype)
    return z, {"S": S, "s": s}
