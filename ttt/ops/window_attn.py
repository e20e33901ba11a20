"""Sliding-window softmax attention, as pure functions on per-head arrays (B, H, N, d).

- `window_attention`: query t sees keys s with t − w < s ≤ t (causal) or |t − s| < w, in O(N w)
  work and memory (LaCT's branch for the order inside a chunk, docs/design.md §14.5): blocks of
  queries, each against the keys its window reaches, in a `lax.scan`, with flash attention's
  backward as a custom VJP (only z and each query's log-sum-exp are kept; one block's
  probabilities are recomputed at a time).
- `window_attention_decode_step` / `window_cache`: decode it over a ring buffer of the last w keys.

Notable choices: causal, the first w tokens' query blocks, whose reach starts before the
sequence, run in up to HEAD_GROUPS scans of their own over the keys that exist; on a CPU the
(sequence, head) pairs go in groups whose block scores fit CPU_SCORES_BYTES (about one core's L2);
the decode step reads the ring buffer before writing to it, which lets XLA:CPU update the buffers
in place in a decode loop.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttt.ops import checks


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
    checks.check_attention_qkv(q, k, v)
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
# a 2048 window at block 128 its own, which scans only the keys that exist; more scans cost
# compile time)
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
