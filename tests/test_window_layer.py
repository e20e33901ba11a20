"""Sliding-window attention layer: against a token-loop reference written here from the
parameters (outputs and gradients), == causal SoftmaxAttention when the window covers the
sequence, decoding past the window (the ring buffer wraps) == forward, a cache that does not grow,
the registry's state size and FLOPs, argument errors and negative controls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close, rel_err

from ttt.layers import SoftmaxAttention, costs, forward_flops, make_mixer, state_size
from ttt.layers.window_layer import SlidingWindowAttention

B, N, C, H = 2, 11, 8, 2  # d = 4
W = 3  # window < N: every token past the third drops keys
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _setup(window=W, seed=0, **kw):
    m = SlidingWindowAttention(C, H, window=window, init_scale=0.5, **F64, **kw)
    x = jax.random.normal(jax.random.key(seed), (B, N, C), jnp.float64)
    return m, m.init(jax.random.key(seed + 1), x), x


def reference(params, x, H, window, theta=10000.0):
    """Token by token from the parameters: projections, RoPE on interleaved pairs at absolute
    positions, then for each t a softmax over the keys s with t − window < s ≤ t."""
    p = params["params"]
    Bx, Nx, Cx = x.shape
    d = Cx // H
    proj = lambda name: x @ p[name]["kernel"] + p[name].get("bias", 0.0)
    q, k, v = (proj(n).reshape(Bx, Nx, H, d) for n in ("wq", "wk", "wv"))  # (B, N, H, d)

    def rope(z):
        angle = jnp.arange(Nx)[:, None] * theta ** (-jnp.arange(0, d, 2) / d)  # (N, d/2)
        cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]  # (N, 1, d/2)
        even, odd = z[..., 0::2], z[..., 1::2]
        return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(z.shape)

    q, k = rope(q), rope(k)
    outs = []
    for t in range(Nx):
        s0 = max(0, t - window + 1)
        logits = jnp.einsum("bhd,bshd->bhs", q[:, t], k[:, s0:t + 1]) / jnp.sqrt(d)
        prob = jax.nn.softmax(logits, axis=-1)
        outs.append(jnp.einsum("bhs,bshd->bhd", prob, v[:, s0:t + 1]))
    z = jnp.stack(outs, axis=1).reshape(Bx, Nx, Cx)
    return z @ p["wo"]["kernel"] + p["wo"].get("bias", 0.0)


reference_jit = jax.jit(reference, static_argnums=(2, 3))  # one compilation, not op by op


@pytest.mark.parametrize("window,use_bias", [(W, False), (1, False), (5, True)])
def test_layer_equals_the_token_loop_reference(x64, window, use_bias):
    m, params, x = _setup(window, use_bias=use_bias)
    y = m.apply(params, x)[0]
    assert_close(y, reference_jit(params, x, H, window), 1e-12, f"window {window}")
    # negative control: a window one token wider
    assert rel_err(reference_jit(params, x, H, window + 1), y) > 1e-3


def test_layer_gradients_equal_the_reference(x64):
    m, params, x = _setup(seed=3)
    probe = jax.random.normal(jax.random.key(7), (B, N, C), jnp.float64)
    loss = lambda f: lambda p, x_: jnp.sum(f(p, x_) * probe)
    grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1)))(params, x)
    got = grad(lambda p, x_: m.apply(p, x_)[0])
    want = grad(lambda p, x_: reference(p, x_, H, W))
    assert_close(got, want, 1e-10, "d(layer) vs d(token loop)")


@pytest.mark.parametrize("use_bias", [False, True])
def test_a_window_covering_the_sequence_is_causal_softmax_attention(x64, use_bias):
    m, params, x = _setup(N, use_bias=use_bias)
    full = SoftmaxAttention(C, H, causal=True, use_bias=use_bias, **F64)
    assert jax.tree.structure(full.init(jax.random.key(0), x)) == jax.tree.structure(params)
    y = m.apply(params, x)[0]
    assert_close(y, full.apply(params, x)[0], 1e-12, "window N vs softmax")
    assert_close(SlidingWindowAttention(C, H, window=4 * N, **F64).apply(params, x)[0], y, 1e-12,
                 "window 4N vs window N")
    # negative control: a window of N − 1 drops the first key of the last query
    short = SlidingWindowAttention(C, H, window=N - 1, use_bias=use_bias, **F64)
    assert rel_err(short.apply(params, x)[0][:, -1], y[:, -1]) > 1e-3


def test_decode_past_the_window_equals_forward(x64):
    m, params, x = _setup(seed=5)
    y, _, full = m.apply(params, x, method="prefill")
    step = jax.jit(lambda c, x_t: m.apply(params, x_t, c, method="step"))
    init = m.apply(params, B, method="init_cache")
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    for n1 in (2, 5):  # a prompt shorter than the window, one longer (its ring already wrapped)
        y1, _, cache = m.apply(params, x[:, :n1], method="prefill")
        assert shapes(cache) == shapes(init)  # W slots whatever the prompt
        ys = [y1]
        for t in range(n1, N):  # N − n1 ≥ 2 W steps: the ring wraps more than once
            y_t, cache = step(cache, x[:, t:t + 1])
            ys.append(y_t)
        assert_close(jnp.concatenate(ys, axis=1), y, 1e-12, f"prefill({n1}) + steps")
        assert shapes(cache) == shapes(init) and int(cache["pos"]) == N
        assert_close(cache, full, 1e-12, "ring after steps vs after prefill(N)")
    cache, ys = init, []
    for t in range(N):
        y_t, cache = step(cache, x[:, t:t + 1])
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, axis=1), y, 1e-12, "steps from init_cache")
    # negative control: a step that forgets the prompt
    wrong, _ = step(init, x[:, 5:6])
    assert rel_err(wrong, y[:, 5:6]) > 1e-3


def test_state_size_and_flops():
    m = make_mixer("swa", 16, 2, window=5)
    x = jnp.zeros((1, 24, 16))
    params = jax.eval_shape(m.init, jax.random.key(0), x)
    cache = jax.eval_shape(lambda p: m.apply(p, x, method="prefill"), params)[2]
    ring = cache["k"].size + cache["v"].size
    assert state_size("swa", 16, 2, 24, window=5) == ring == 2 * 5 * 16
    assert state_size("swa", 16, 2, 4 * 24, window=5) == ring  # constant in the context
    # one key per query at window 1; the causal half of softmax's N² scores at window ≥ N
    assert forward_flops("swa", 64, 16, 2, window=1) == costs.dense(64, 16) + 4.0 * 16 * 64
    full = forward_flops("swa", 64, 16, 2, window=64) - costs.dense(64, 16)
    assert full == 4.0 * 16 * 64 * 65 / 2
    assert forward_flops("swa", 64, 16, 2, window=128) == forward_flops("swa", 64, 16, 2,
                                                                        window=64)


@pytest.mark.parametrize("kw,match", [
    ({"window": 0}, "window"),
    ({"block": 0}, "block"),
    ({"num_heads": 8}, "even head dim"),  # d = 1 with RoPE
    ({"num_heads": 3}, "not divisible"),
])
def test_bad_attributes_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        SlidingWindowAttention(**{"width": 8, "num_heads": 2, **kw})
