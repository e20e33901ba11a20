"""Sliding-window attention (docs/design.md §14.5): the blocked op and its flash-attention
backward against the masked N×N reference (outputs and gradients, causal or not), in head groups
with the CPU default, the causal first blocks' own scans, and decode over the ring buffer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ttt.ops import window_attn as A

B, H, D = 2, 2, 4


def _masked_reference(q, k, v, w, causal):
    n = q.shape[2]
    t, s = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    ok = ((s <= t) & (s > t - w)) if causal else (jnp.abs(s - t) < w)
    logits = jnp.where(ok, jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1]), -jnp.inf)
    return jnp.einsum("bhts,bhsv->bhtv", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("window,block,causal", [(5, 3, True), (5, 3, False), (8, 8, True),
                                                 (1, 4, True), (40, 16, False), (6, 32, True),
                                                 (20, 2, True), (40, 4, True)])
def test_window_attention_equals_the_masked_reference(x64, window, block, causal):
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.normal(size=(B, H, 23, D))) for _ in range(4))
    run = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * ct)
    fast = lambda q, k, v: A.window_attention(q, k, v, window=window, block=block, causal=causal)
    ref = lambda q, k, v: _masked_reference(q, k, v, window, causal)
    assert_close(fast(q, k, v), ref(q, k, v), 1e-12, "window attention")
    grads = [jax.grad(run(f), argnums=(0, 1, 2))(q, k, v) for f in (fast, ref)]
    assert_close(grads[0], grads[1], 1e-12, "window attention gradients")


@pytest.mark.parametrize("causal", [True, False])
def test_window_attention_in_head_groups(x64, causal):
    """(sequence, head) pairs one group per step (a CPU's cache-sized steps) give the same
    outputs and gradients as all at once; the default takes all of them off a CPU and as many
    as fit CPU_SCORES_BYTES on one."""
    rng = np.random.default_rng(2)
    q, k, v, ct = (jnp.asarray(rng.normal(size=(B, H, 19, D))) for _ in range(4))
    run = lambda g: lambda q, k, v: jnp.sum(ct * A.window_attention(
        q, k, v, window=6, block=4, causal=causal, heads_per_step=g))
    whole = (run(B * H)(q, k, v), jax.grad(run(B * H), argnums=(0, 1, 2))(q, k, v))
    for g in (1, 2):
        assert_close((run(g)(q, k, v), jax.grad(run(g), argnums=(0, 1, 2))(q, k, v)), whole,
                     1e-12, f"{g} pairs per step")
    with pytest.raises(ValueError, match="heads_per_step: expected a divisor of B·H = 4, got 3"):
        run(3)(q, k, v)
    span_bytes = 128 * (2048 + 128) * 4  # block 128 at w = 2048, float32: one pair's scores
    pick = lambda pairs, backend: A._default_heads_per_step(pairs, 8192, 2048, True, 128,
                                                            jnp.float32, backend)
    assert pick(12, "gpu") == 12
    assert pick(12, "cpu") == max(g for g in (1, 2, 3, 4, 6, 12)
                                  if g * span_bytes <= A.CPU_SCORES_BYTES)
    assert pick(7, "cpu") == 1  # a prime count larger than fits: one pair per step


def test_causal_window_skips_the_keys_before_the_sequence():
    """The first w tokens' query blocks scan only keys that exist: at N = w = 2048, block 128,
    each of the 16 head blocks its own scan over its (m + 1) · 128 keys: 2.2 M (query, key) pairs
    instead of 16 · 128 · 2175 = 4.5 M (exact: 2.1 M)."""
    def computed(N, w, s, causal=True):
        lay = A._blocks(N, w, causal, s)
        segs = A._segments(lay, causal)
        assert [(g.m0, g.m1) for g in segs][0][0] == 0 and segs[-1].m1 == lay.M
        # every block exactly once, in order
        assert all(a.m1 == b.m0 for a, b in zip(segs, segs[1:], strict=False))
        return sum((g.m1 - g.m0) * s * g.span for g in segs)

    assert A.HEAD_GROUPS >= 16
    assert computed(2048, 2048, 128) == 128 * 128 * sum(range(1, 17))
    assert computed(8192, 2048, 128) == computed(2048, 2048, 128) + 48 * 128 * (2048 + 128)
    assert computed(2048, 2048, 128, causal=False) == 16 * 128 * (33 * 128)  # one scan


def test_window_attention_decode_and_cache(x64):
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, 13, D))) for _ in range(3))
    w = 5
    K = V = jnp.zeros((B, H, w, D))
    zs = []
    for t in range(13):
        z_t, K, V = A.window_attention_decode_step(K, V, q[:, :, t], k[:, :, t], v[:, :, t],
                                                   jnp.asarray(t, jnp.int32))
        zs.append(z_t)
    assert_close(jnp.stack(zs, axis=2), _masked_reference(q, k, v, w, True), 1e-12, "decode")
    assert_close(A.window_cache(k, v, w), (K, V), 0.0, "ring buffers from a prefill")
