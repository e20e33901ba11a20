"""Attention baselines and their TTT twins, as pure functions on per-head arrays (B, H, N, d).

- `softmax_attention`: scaled dot-product attention, causal or not, with memory linear in N:
  cuDNN's fused attention on a GPU (bf16/fp16), elsewhere XLA over rematerialised query chunks.
- `kernel_regression`: the Nadaraya–Watson estimator z_t = Σ_s κ(k_s, q_t) v_s / Σ_s κ(k_s, q_t)
  with an arbitrary kernel. With κ(k, q) = exp(kᵀq/√d) it *is* softmax attention (TTT-LM
  Theorem 2, docs/design.md §7.3); it is written as an explicit ratio, not via softmax, so the
  test of that identity compares two different computations.
- `linear_attention`: z_t = Σ_{s≤t} v_s (φ(k_s)·φ(q_t)) [/ normaliser], in three forms that must
  agree: "quadratic" (masked N×N, the reference), "cumsum" (cumulative outer-product states,
  O(N d dv) memory), and "chunked" (masked quadratic inside chunks of c tokens plus a state carried
  across chunks by `lax.scan`; the fast form). Non-causal uses one global state (design.md §7.1).
- `linear_attention_decode_step`: one token of the recurrent form; a loop of it reproduces the
  causal forward.
- `window_attention`: sliding-window softmax attention in O(N w) (LaCT's branch for the order
  inside a chunk, docs/design.md §14.5), blocked with a flash-attention backward;
  `window_attention_decode_step` / `window_cache` decode it over a ring buffer of the last w keys.

Notable choices: the adaptive normaliser adds `eps` to the denominator (φ = identity can make it
vanish); "constant" divides by the number of tokens summed (t+1 causal, N non-causal), which is
what one full-batch GD step of TTT-Linear computes with the loss averaged over tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttt.ops import checks

_FEATURE_MAPS = (None, "elu")
_NORMALIZERS = (None, "adaptive", "constant")
_FORMS = ("cumsum", "chunked", "quadratic")


def _check_qkv(q, k, v) -> None:
    """q, k (B, H, N, d) alike; v (B, H, N, dv); one floating dtype."""
    checks.check_qkv(q, k, v, "d", "dv")
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.check_floating(name, x)
    checks.check_same_dtype(q=q, k=k, v=v)


def _causal_mask(n: int) -> jax.Array:
    """(n, n) bool, True where key s may be seen by query t (s <= t, diagonal included)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))


# ----------------------------------------------------------------------------- softmax / kernel


IMPLEMENTATIONS = ("auto", "xla", "cudnn")
DEFAULT_CHUNK = 512  # queries per chunk of the "xla" implementation


def softmax_attention(q, k, v, *, causal: bool = True, scale: float | None = None,
                      implementation: str = "auto", chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """Scaled dot-product attention, with memory linear in N.

    q, k: (B, H, N, d); v: (B, H, N, dv) -> z (B, H, N, dv), in q's dtype promoted to at least
    float32 ("xla") or in q's dtype ("cudnn").
    z_t = Σ_s softmax_s(scale · k_s·q_t) v_s over s ≤ t (causal) or all s; scale defaults to 1/√d.
    Causal rows always contain the diagonal, so -inf masking never yields an all-masked row.

    implementation:
      "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused (flash)
        attention on an NVIDIA GPU: inputs bfloat16 or float16, dv = d <= 128 and a multiple of
        8; softmax in float32.
      "xla": XLA, in the inputs' precision promoted to at least float32, over chunks of `chunk`
        queries, each rematerialised in the backward pass (a `jax.checkpoint`ed scan): forward
        and backward hold O(N · chunk) scores instead of O(N²); one chunk when N <= chunk.
        (Written out rather than through jax.nn.dot_product_attention's XLA path, which rounds
        the softmax to float32 and needs dv = d; the float64 identities the tests hold need both.)
      "auto": "cudnn" where it applies (`cudnn_applies`), else "xla".
    """
    _check_qkv(q, k, v)
    checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
    checks.check_int("chunk", chunk, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if implementation == "auto":
        implementation = "cudnn" if cudnn_applies(q, v) else "xla"
    if implementation == "cudnn":
        bnhd = lambda x: jnp.swapaxes(x, 1, 2)  # (B, H, N, d) <-> (B, N, H, d)
        z = jax.nn.dot_product_attention(bnhd(q), bnhd(k), bnhd(v), scale=scale,
                                         is_causal=causal, implementation="cudnn")
        return bnhd(z)
    return _xla_chunked(q, k, v, causal, scale, min(int(chunk), q.shape[2]))


def cudnn_applies(q, v) -> bool:
    """Whether cuDNN's fused attention takes q (B, H, N, d), v (B, H, N, dv): a GPU backend,
    bfloat16 or float16, dv = d <= 128 and a multiple of 8."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and v.shape[-1] == d and d <= 128 and d % 8 == 0)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _xla_chunked(q, k, v, causal, scale, chunk):
    B, H, N, d = q.shape
    dt = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = (x.astype(dt) for x in (q, k, v))
    M = -(-N // chunk)
    # (M, B, H, c, d): query chunks first for the scan; padded queries are sliced off below
    q_c = jnp.pad(q, ((0, 0), (0, 0), (0, M * chunk - N), (0, 0)))
    q_c = jnp.moveaxis(q_c.reshape(B, H, M, chunk, d), 2, 0)

    @jax.checkpoint
    def one(q_i, start, k, v):  # q_i (B, H, c, d): the queries at positions start .. start+c-1
        logits = jnp.einsum("bhtd,bhsd->bhts", q_i, k) * scale  # (B, H, c, N)
        if causal:
            t = start + jnp.arange(chunk)  # (c,)
            logits = jnp.where(jnp.arange(N)[None, :] <= t[:, None], logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)  # max-subtracted inside
        return jnp.einsum("bhts,bhsv->bhtv", weights, v)  # (B, H, c, dv)

    z = jax.lax.map(lambda xs: one(xs[0], xs[1], k, v), (q_c, jnp.arange(M) * chunk))
    z = jnp.moveaxis(z, 0, 2).reshape(B, H, M * chunk, -1)  # (B, H, M·c, dv)
    return z[:, :, :N]


def exp_kernel(k, q) -> jax.Array:
    """κ(k, q) = exp(kᵀq / √d) for one key k (d,) and one query q (d,) -> scalar."""
    return jnp.exp(jnp.dot(k, q) / math.sqrt(k.shape[-1]))


def kernel_regression(q, k, v, *, causal: bool = True, kernel: Callable | None = None) -> jax.Array:
    """Nadaraya–Watson kernel regression trained on the (k, v) pairs (TTT-LM Theorem 2, E4).

    q, k: (B, H, N, d); v: (B, H, N, dv) -> z (B, H, N, dv).
    z_t = Σ_s κ(k_s, q_t) v_s / Σ_s κ(k_s, q_t) over s ≤ t (causal) or all s.
    `kernel(k, q)` takes one key (d,) and one query (d,) and returns a non-negative scalar; it is
    vmapped over all pairs. Default `exp_kernel` (exp(kᵀq/√d)), which makes this softmax attention.
    No max-subtraction: this is the literal estimator, so huge logits overflow where softmax would
    not (use it as a reference, not a fast path).
    """
    _check_qkv(q, k, v)
    return _kernel_regression(q, k, v, causal, exp_kernel if kernel is None else kernel)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kernel_regression(q, k, v, causal, kernel):
    pair = jax.vmap(jax.vmap(kernel, in_axes=(0, None)), in_axes=(None, 0))  # (N,d),(N,d) -> (t, s)
    kappa = jax.vmap(jax.vmap(pair))(k, q)  # (B, H, N_t, N_s)
    if causal:
        kappa = jnp.where(_causal_mask(q.shape[2]), kappa, 0.0)
    numerator = jnp.einsum("bhts,bhsv->bhtv", kappa, v)  # (B, H, N, dv)
    denominator = jnp.sum(kappa, axis=-1, keepdims=True)  # (B, H, N, 1)
    return numerator / denominator


# ----------------------------------------------------------------------------- linear attention


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


def _linear_quadratic(fq, fk, v, causal):
    """Reference: A = φ(q) φ(k)ᵀ masked; returns (A v, row sums of A), (B,H,N,dv), (B,H,N)."""
    scores = jnp.einsum("bhtd,bhsd->bhts", fq, fk)  # (B, H, N, N)
    if causal:
        scores = jnp.where(_causal_mask(fq.shape[2]), scores, 0.0)
    return jnp.einsum("bhts,bhsv->bhtv", scores, v), scores.sum(-1)


def _linear_cumsum(fq, fk, v):
    """Causal via cumulative states S_t = Σ_{s≤t} φ(k_s) v_sᵀ; memory O(N d dv)."""
    S = jnp.cumsum(jnp.einsum("bhsd,bhsv->bhsdv", fk, v), axis=2)  # (B, H, N, d, dv)
    s = jnp.cumsum(fk, axis=2)  # (B, H, N, d)
    num = jnp.einsum("bhtd,bhtdv->bhtv", fq, S)  # (B, H, N, dv)
    return num, jnp.einsum("bhtd,bhtd->bht", fq, s)


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
    mask = _causal_mask(c)

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
    """
    _check_qkv(q, k, v)
    checks.check_choice("feature_map", feature_map, _FEATURE_MAPS)
    checks.check_choice("normalize", normalize, _NORMALIZERS)
    checks.check_choice("form", form, _FORMS)
    if int(chunk) < 1:
        raise ValueError(f"chunk: expected a positive chunk size, got {chunk}")
    return _linear_attention(q, k, v, causal, feature_map, normalize, form, int(chunk), eps)


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
):
    """One token of causal linear attention in recurrent form -> (z_t, state).

    state = {"S": (B, H, d, dv), "s": (B, H, d)} (sums over the tokens seen so far);
    q_t, k_t: (B, H, d); v_t: (B, H, dv) -> z_t (B, H, dv).
    S ← S + φ(k_t) v_tᵀ, s ← s + φ(k_t), z_t = φ(q_t) S [/ (φ(q_t)·s + eps)].
    normalize: False/None, True/"adaptive", or "constant" (divide by position + 1; `position` is
    the 0-based index of this token, required then). Matches `linear_attention(causal=True)`.
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
    S = state["S"] + jnp.einsum("bhd,bhv->bhdv", fk, v_t)  # (B, H, d, dv)
    s = state["s"] + fk  # (B, H, d)
    z = jnp.einsum("bhd,bhdv->bhv", fq, S)  # (B, H, dv)
    if normalize == "adaptive":
        z = z / (jnp.einsum("bhd,bhd->bh", fq, s) + eps)[..., None]
    elif normalize == "constant":
        z = z / (jnp.asarray(position) + 1).astype(z.dtype)
    return z, {"S": S, "s": s}


# ----------------------------------------------------------------------------- sliding window


def _window_reach(window: int, block: int) -> int:
    """Key blocks before (and, non-causal, after) a query block that a window of w can reach."""
    return -(-(window - 1) // block)


def window_attention(q, k, v, *, window: int, causal: bool = True, block: int | None = None,
                     scale: float | None = None, heads_per_step: int | None = None) -> jax.Array:
    """Sliding-window softmax attention: query t sees keys s with t − w < s ≤ t (causal) or
    |t − s| < w (non-causal), w = `window`; scale defaults to 1/√d.

    q, k: (B, H, N, d); v: (B, H, N, dv) -> z (B, H, N, dv). Work and memory are O(N w), not
    O(N²): queries go in blocks of `block` tokens (default min(w, 128)), each block against the
    keys of the blocks its window reaches (w + block − 1 keys causal), one block at a time in a
    `lax.scan`; causal, the first w tokens' blocks, whose reach starts before the sequence, run
    in up to HEAD_GROUPS scans of their own over the keys that exist. The backward is flash
    attention's: only z and each query's log-sum-exp are kept, and one block's probabilities are
    recomputed at a time (never N × (w + block) of them).
    With w ≥ N it is full (causal) attention.

    heads_per_step: how many of the B·H (sequence, head) pairs one block step takes (a divisor
    of B·H); the pairs go in groups of that many, one group after another. None: all of them on
    an accelerator; on a CPU as many as keep one step's (block × keys) scores within
    CPU_SCORES_BYTES, so that the step's passes over them stay in the core's cache (12 heads at
    w = 2048, block 128: 2 per step, forward+backward 1.71 -> 1.45 s at N = 8k).
    """
    _check_qkv(q, k, v)
    checks.check_int("window", window, 1)
    block = min(window, 128) if block is None else block
    checks.check_int("block", block, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    B, H, N = q.shape[:3]
    pairs = B * H
    if heads_per_step is None:
        heads_per_step = _default_heads_per_step(pairs, N, window, causal, block, q.dtype)
    checks.check_int("heads_per_step", heads_per_step, 1)
    if pairs % heads_per_step:
        raise ValueError(f"heads_per_step: expected a divisor of B·H = {pairs}, got "
                         f"{heads_per_step}")
    if heads_per_step == pairs:
        return _window_attention(q, k, v, window, causal, block, scale)
    groups = lambda x: x.reshape(pairs // heads_per_step, 1, heads_per_step, *x.shape[2:])
    z = jax.lax.map(lambda a: _window_attention(*a, window, causal, block, scale),
                    (groups(q), groups(k), groups(v)))
    return z.reshape(B, H, *z.shape[3:])


# a CPU block step's (pairs, block, keys) scores: about one core's L2 (2 pairs at w = 2048,
# block 128: measured faster than 1 or 3)
CPU_SCORES_BYTES = 5 * 2**19


def _default_heads_per_step(pairs, N, window, causal, block, dtype, backend=None) -> int:
    """`window_attention`'s heads_per_step=None: all pairs off a CPU; on a CPU the largest
    divisor of `pairs` whose scores fit CPU_SCORES_BYTES (at least 1)."""
    if (backend or jax.default_backend()) != "cpu":
        return pairs
    per_pair = block * _blocks(N, window, causal, block).span * jnp.dtype(dtype).itemsize
    fits = [g for g in range(1, pairs + 1) if pairs % g == 0 and g * per_pair <= CPU_SCORES_BYTES]
    return max(fits, default=1)


class _Blocks(NamedTuple):
    """The blocked layout of `window_attention`: s tokens per query block, M blocks, r key blocks
    before (and `after` behind) each, `span` keys per block, keys padded in front by r·s."""

    s: int
    M: int
    r: int
    after: int
    span: int


def _blocks(N: int, window: int, causal: bool, s: int) -> _Blocks:
    M = -(-N // s)
    r = _window_reach(window, s)
    after = 0 if causal else r
    return _Blocks(s, M, r, after, (r + 1 + after) * s)


def _pad_keys(x, N: int, lay: _Blocks):
    """(B, H, N, ·) -> (B, H, (M + r + after)·s, ·): block m's keys are [m·s, m·s + span)."""
    return jnp.pad(x, ((0, 0), (0, 0), (lay.r * lay.s, (lay.M + lay.after) * lay.s - N), (0, 0)))


def _query_blocks(x, lay: _Blocks):
    """(B, H, N, ·) -> (M, B, H, s, ·), zero-padded to whole blocks."""
    B, H, N = x.shape[:3]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, lay.M * lay.s - N)) + ((0, 0),) * (x.ndim - 3))
    return jnp.moveaxis(x.reshape(B, H, lay.M, lay.s, *x.shape[3:]), 2, 0)


def _unblock(x, N: int):
    """(M, B, H, s, ·) -> (B, H, N, ·)."""
    M, B, H, s = x.shape[:4]
    return jnp.moveaxis(x, 0, 2).reshape(B, H, M * s, *x.shape[4:])[:, :, :N]


# causal: the first r query blocks go in up to this many scans of their own (16: each block of
# a 2048 window at block 128 its own; LaCT layer fwd+bwd at 2k 668 -> 557 ms against 4, compile
# 3.6 -> 5.9 s)
HEAD_GROUPS = 16


class _Segment(NamedTuple):
    """Query blocks [m0, m1), each against `span` keys: from its own start m·s in the padded keys
    (`head` False), or from key 0 (`head` True: the first blocks of a causal window, whose padded
    front would be all masked)."""

    m0: int
    m1: int
    span: int
    head: bool


def _segments(lay: _Blocks, causal: bool) -> list[_Segment]:
    """Causal: the first min(r, M) blocks see only keys [0, (m + 1)·s), so they run in up to
    HEAD_GROUPS scans over keys [0, m1·s) each (N = w = 2048, s = 128: 2.2 instead of 4.5 M
    (query, key) pairs, the math's 2.1 M) and the rest in one scan of `span` keys. Non-causal:
    one scan."""
    if not causal or lay.r == 0:
        return [_Segment(0, lay.M, lay.span, False)]
    head = min(lay.r, lay.M)
    size = -(-head // HEAD_GROUPS)
    segs = [_Segment(g, min(g + size, head), min(g + size, head) * lay.s, True)
            for g in range(0, head, size)]
    if lay.M > head:
        segs.append(_Segment(head, lay.M, lay.span, False))
    return segs


def _key_start(m, seg: _Segment, lay: _Blocks):
    """Where block m's keys start in the padded keys (real position start − r·s)."""
    return lay.r * lay.s if seg.head else m * lay.s


def _block_mask(m, start, seg: _Segment, N: int, window: int, causal: bool, lay: _Blocks):
    """(s, span) bool: which of the keys [start, start + span) (padded) block m's queries see."""
    key_pos = start - lay.r * lay.s + jnp.arange(seg.span)  # real positions
    rel = key_pos[None, :] - (m * lay.s + jnp.arange(lay.s))[:, None]  # k − q
    near = (rel <= 0) & (rel > -window) if causal else jnp.abs(rel) < window
    return near & ((key_pos >= 0) & (key_pos < N))[None, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _window_attention(q, k, v, window, causal, s, scale):
    return _window_forward(q, k, v, window, causal, s, scale)[0]


def _window_forward(q, k, v, window, causal, s, scale):
    """Block by block: z (B, H, N, dv) and the log-sum-exp of every query's logits (B, H, N)."""
    N = q.shape[2]
    lay = _blocks(N, window, causal, s)
    kp, vp = _pad_keys(k, N, lay), _pad_keys(v, N, lay)
    qb = _query_blocks(q, lay)

    def run(seg: _Segment):
        def body(carry, xs):
            m, q_m = xs  # (), (B, H, s, d)
            start = _key_start(m, seg, lay)
            k_m = jax.lax.dynamic_slice_in_dim(kp, start, seg.span, axis=2)  # (B, H, span, d)
            v_m = jax.lax.dynamic_slice_in_dim(vp, start, seg.span, axis=2)
            ok = _block_mask(m, start, seg, N, window, causal, lay)
            logits = jnp.where(ok, jnp.einsum("bhtd,bhsd->bhts", q_m, k_m) * scale, -jnp.inf)
            top = jnp.max(logits, axis=-1, keepdims=True)  # (B, H, s, 1)
            top = jnp.where(jnp.isfinite(top), top, 0.0)  # a padded query row may see no key
            p = jnp.exp(logits - top)  # masked entries: exp(−inf) = 0
            den = jnp.sum(p, axis=-1, keepdims=True)
            den = jnp.where(den > 0, den, 1.0)
            out = jnp.einsum("bhts,bhsv->bhtv", p, v_m) / den  # (B, H, s, dv)
            return carry, (out, (top + jnp.log(den))[..., 0])

        return jax.lax.scan(body, None, (jnp.arange(seg.m0, seg.m1), qb[seg.m0:seg.m1]))[1]

    parts = [run(seg) for seg in _segments(lay, causal)]
    cat = lambda xs: jnp.concatenate(xs, axis=0) if len(xs) > 1 else xs[0]
    z, lse = (cat(xs) for xs in zip(*parts, strict=True))
    return _unblock(z, N), _unblock(lse[..., None], N)[..., 0]


def _window_fwd(q, k, v, window, causal, s, scale):
    z, lse = _window_forward(q, k, v, window, causal, s, scale)
    return z, (q, k, v, z, lse)


def _window_bwd(window, causal, s, scale, res, dz):
    """Flash-attention backward, block by block: recompute P = exp(S − lse) once; dV += Pᵀ dz,
    dS = P ⊙ (dz Vᵀ − δ), δ = rowsum(dz ⊙ z); dQ = dS K·scale; dK += dSᵀ Q·scale."""
    q, k, v, z, lse = res
    N = q.shape[2]
    lay = _blocks(N, window, causal, s)
    kp, vp = _pad_keys(k, N, lay), _pad_keys(v, N, lay)
    delta = jnp.sum(dz * z, axis=-1)  # (B, H, N)
    blocks = lambda x: _query_blocks(x, lay)
    xs_all = (blocks(q), blocks(dz), blocks(lse[..., None])[..., 0],
              blocks(delta[..., None])[..., 0])

    def run(carry, seg: _Segment):
        def body(carry, xs):
            dkp, dvp = carry  # gradients of the padded keys / values
            m, q_m, dz_m, lse_m, delta_m = xs
            start = _key_start(m, seg, lay)
            k_m = jax.lax.dynamic_slice_in_dim(kp, start, seg.span, axis=2)
            v_m = jax.lax.dynamic_slice_in_dim(vp, start, seg.span, axis=2)
            ok = _block_mask(m, start, seg, N, window, causal, lay)
            logits = jnp.einsum("bhtd,bhsd->bhts", q_m, k_m) * scale
            p = jnp.where(ok, jnp.exp(logits - lse_m[..., None]), 0.0)  # (B, H, s, span)
            dp = jnp.einsum("bhtv,bhsv->bhts", dz_m, v_m)
            ds = p * (dp - delta_m[..., None]) * scale
            dq_m = jnp.einsum("bhts,bhsd->bhtd", ds, k_m)
            add = lambda acc, upd: jax.lax.dynamic_update_slice_in_dim(
                acc, jax.lax.dynamic_slice_in_dim(acc, start, seg.span, axis=2) + upd, start,
                axis=2)
            dkp = add(dkp, jnp.einsum("bhts,bhtd->bhsd", ds, q_m))
            dvp = add(dvp, jnp.einsum("bhts,bhtv->bhsv", p, dz_m))
            return (dkp, dvp), dq_m

        xs = (jnp.arange(seg.m0, seg.m1), *(x[seg.m0:seg.m1] for x in xs_all))
        return jax.lax.scan(body, carry, xs)

    carry, dqs = (jnp.zeros_like(kp), jnp.zeros_like(vp)), []
    for seg in _segments(lay, causal):
        carry, dq = run(carry, seg)
        dqs.append(dq)
    dkp, dvp = carry
    dq = jnp.concatenate(dqs, axis=0) if len(dqs) > 1 else dqs[0]
    unpad = lambda x: x[:, :, lay.r * s: lay.r * s + N]
    return _unblock(dq, N), unpad(dkp), unpad(dvp)


_window_attention.defvjp(_window_fwd, _window_bwd)


def window_attention_decode_step(cache_k, cache_v, q_t, k_t, v_t, pos, *,
                                 scale: float | None = None):
    """One token of causal sliding-window attention over a ring buffer of the last w keys/values.

    cache_k, cache_v: (B, H, w, d) / (B, H, w, dv), slot p mod w holding position p; q_t, k_t
    (B, H, d); v_t (B, H, dv); pos: int32 scalar, the position of this token. Attends to the
    filled slots but the one this token takes over (it holds position pos − w, out of the
    window) and to the token itself, then writes k_t, v_t at slot pos mod w. Reading the cache
    before the write lets XLA:CPU update the ring buffers in place in a decode loop (the write
    feeds only the returned cache).
    Returns (z_t (B, H, dv), cache_k, cache_v). Matches `window_attention(causal=True)`.
    """
    w = cache_k.shape[2]
    scale = 1.0 / math.sqrt(q_t.shape[-1]) if scale is None else scale
    slot = pos % w
    logits = jnp.einsum("bhd,bhsd->bhs", q_t, cache_k.astype(q_t.dtype)) * scale  # (B, H, w)
    j = jnp.arange(w)
    logits = jnp.where((j < pos) & (j != slot), logits, -jnp.inf)
    own = jnp.einsum("bhd,bhd->bh", q_t, k_t)[..., None] * scale  # (B, H, 1): itself
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), own)
    p, p_t = jnp.exp(logits - top), jnp.exp(own - top)
    z = (jnp.einsum("bhs,bhsv->bhv", p, cache_v.astype(q_t.dtype)) + p_t * v_t) / (
        jnp.sum(p, axis=-1, keepdims=True) + p_t)
    K = jax.lax.dynamic_update_slice_in_dim(cache_k, k_t[:, :, None].astype(cache_k.dtype), slot,
                                            axis=2)
    V = jax.lax.dynamic_update_slice_in_dim(cache_v, v_t[:, :, None].astype(cache_v.dtype), slot,
                                            axis=2)
    return z, K, V


def window_cache(k, v, window: int):
    """The ring buffers `window_attention_decode_step` continues from after the N keys/values k
    (B, H, N, d), v (B, H, N, dv): slot p mod w holds position p for the last min(N, w) tokens."""
    B, H, N, _ = k.shape
    L = min(N, window)
    slots = jnp.arange(N - L, N) % window
    ring = lambda x: jnp.zeros((B, H, window, x.shape[-1]), x.dtype).at[:, :, slots].set(
        x[:, :, N - L:])
    return ring(k), ring(v)
