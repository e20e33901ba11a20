"""Softmax attention, kernel regression and linear attention side by side: causality, jit and
gradients, shape and dtype errors; and the (q, k, v) draws their test files share."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.ops.linear_attn import (
    linear_attention,
    linear_attention_decode_step,
    linear_attention_init_state,
)
from ttt.ops.softmax_attn import kernel_regression, softmax_attention

B, H, N, D, DV = 2, 2, 13, 8, 6  # N = 13 is not a multiple of the chunk sizes the tests use


def _qkv(dtype, seed=0, n=N):
    # numpy draws: jax.random compiles per shape, which dominates a small CPU test
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, n, w)) for w in (D, D, DV))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


# ----------------------------------------------------------------------------- causality

CAUSAL_OPS = {
    "softmax": lambda q, k, v: softmax_attention(q, k, v, causal=True),
    "kernel_regression": lambda q, k, v: kernel_regression(q, k, v, causal=True),
    **{
        f"linear_{form}": (
            lambda q, k, v, form=form: linear_attention(
                q, k, v, form=form, chunk=4, feature_map="elu", normalize="adaptive"
            )
        )
        for form in ("chunked", "cumsum", "quadratic")
    },
}


@pytest.mark.parametrize("name", list(CAUSAL_OPS))
def test_causality(x64, name):
    op = CAUSAL_OPS[name]
    q, k, v = _qkv("float64", seed=5)
    base = op(q, k, v)
    t = 6  # inside the second chunk of 4
    for which in range(3):
        args = [q, k, v]
        args[which] = args[which].at[:, :, t].add(1.0)
        out = op(*args)
        np.testing.assert_array_equal(out[:, :, :t], base[:, :, :t], err_msg=f"{name} arg {which}")
        assert rel_err(out[:, :, t:], base[:, :, t:]) > 1e-3, f"{name}: perturbation had no effect"


# ----------------------------------------------------------------------------- jit, grad, errors


def test_jit_and_grad(x64):
    q, k, v = _qkv("float64", seed=6)

    def grads(ops):
        """Gradients of Σ sin(op(q, k, v)) w.r.t. q, k, v for every op, in one compile."""
        grad = lambda op: jax.grad(lambda *a: jnp.sum(jnp.sin(op(*a))), argnums=(0, 1, 2))
        return jax.jit(lambda q, k, v: [grad(op)(q, k, v) for op in ops])(q, k, v)

    kw = dict(feature_map="elu", normalize="adaptive")
    g_soft, g_kr, g_quad, g_chunk = grads(
        [
            softmax_attention,
            kernel_regression,
            lambda q, k, v: linear_attention(q, k, v, form="quadratic", **kw),
            lambda q, k, v: linear_attention(q, k, v, form="chunked", chunk=5, **kw),
        ]
    )
    assert_close(g_kr, g_soft, 1e-10, "grad kernel regression vs softmax")
    assert_close(g_chunk, g_quad, 1e-10, "grad chunked vs quadratic")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g_quad))


def test_bad_arguments_raise():
    q, k, v = _qkv("float32")
    with pytest.raises(ValueError, match=r"k: expected shape \(B, H, N, d\) = \(2, 2, 13, 8\)"):
        softmax_attention(q, k[:, :, :-1], v)
    with pytest.raises(ValueError, match=r"v: expected shape \(B, H, N, dv\)"):
        linear_attention(q, k, v[:, :, :-1])
    with pytest.raises(ValueError, match=r"q: expected a rank-4 array"):
        kernel_regression(q[0], k, v)
    with pytest.raises(ValueError, match="floating-point"):
        linear_attention(q.astype(jnp.int32), k.astype(jnp.int32), v)
    with pytest.raises(ValueError, match="share one dtype"):
        softmax_attention(q, k, v.astype(jnp.float16))
    with pytest.raises(ValueError, match="form: unknown"):
        linear_attention(q, k, v, form="recurrent")
    with pytest.raises(ValueError, match="feature_map: unknown"):
        linear_attention(q, k, v, feature_map="relu")
    with pytest.raises(ValueError, match="normalize: unknown"):
        linear_attention(q, k, v, normalize="sum")
    state = linear_attention_init_state(B, H, D, DV)
    with pytest.raises(ValueError, match=r'state\["S"\]: expected shape'):
        linear_attention_decode_step(state, q[:, :, 0], k[:, :, 0], v[:, :, 0, :-1])
    with pytest.raises(ValueError, match="position: required"):
        linear_attention_decode_step(
            state, q[:, :, 0], k[:, :, 0], v[:, :, 0], normalize="constant"
        )
