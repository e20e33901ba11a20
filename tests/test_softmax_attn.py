"""Softmax attention: == kernel regression (E4) and == a numpy reference; query chunks == one
chunk (outputs and gradients) with memory linear in N; kernel regression with another kernel; the
scale argument."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err
from test_attn_common import N, _qkv

from ttt.ops.softmax_attn import cudnn_applies, kernel_regression, softmax_attention

TOL = {"float64": 1e-10, "float32": 1e-5}


def _np_softmax_attention(q, k, v, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bhsv->bhtv", w / w.sum(-1, keepdims=True), v)  # (B, H, N, dv)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_attention_equals_kernel_regression(x64, causal, dtype):
    q, k, v = _qkv(dtype)
    z_soft = softmax_attention(q, k, v, causal=causal)
    z_kr = kernel_regression(q, k, v, causal=causal)
    assert z_soft.dtype == z_kr.dtype == jnp.dtype(dtype)
    err = assert_close(z_kr, z_soft, TOL[dtype], f"E4 kernel regression vs softmax ({dtype})")
    assert_close(z_soft, _np_softmax_attention(q, k, v, causal), TOL[dtype], "softmax vs numpy")
    print(f"E4 causal={causal} {dtype}: rel err {err:.2e}")
    # Negative control: the kernel without 1/√d is a different estimator.
    unscaled = lambda kk, qq: jnp.exp(jnp.dot(kk, qq))
    assert rel_err(kernel_regression(q, k, v, causal=causal, kernel=unscaled), z_soft) > 1e-2


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_attention_in_query_chunks(x64, causal, dtype):
    """Chunks of 4 queries (N = 13: a partial last chunk) == one chunk == numpy, outputs and
    gradients; in float32 also == jax.nn.dot_product_attention's XLA path (dv = d there)."""
    q, k, v = _qkv(dtype)
    whole = softmax_attention(q, k, v, causal=causal, chunk=N)
    chunked = softmax_attention(q, k, v, causal=causal, chunk=4)
    assert chunked.dtype == jnp.dtype(dtype)
    assert_close(chunked, _np_softmax_attention(q, k, v, causal), TOL[dtype], "chunks vs numpy")
    assert_close(chunked, whole, TOL[dtype], "4-query chunks vs one chunk")
    loss = lambda c: jax.grad(lambda *a: jnp.sum(jnp.sin(softmax_attention(
        *a, causal=causal, chunk=c))), argnums=(0, 1, 2))
    assert_close(loss(4)(q, k, v), loss(N)(q, k, v), TOL[dtype], "gradients, chunks vs one")
    if dtype == "float32":
        vd = jnp.asarray(np.random.default_rng(1).standard_normal(k.shape), jnp.float32)
        api = jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, vd)),
                                           is_causal=causal, implementation="xla")
        assert_close(softmax_attention(q, k, vd, causal=causal, chunk=4),
                     jnp.swapaxes(api, 1, 2), 1e-5, "vs jax.nn.dot_product_attention")
    assert not cudnn_applies(q, v)  # a CPU run takes the XLA path


def test_softmax_attention_memory_is_linear_in_n():
    """XLA's temporaries for forward + backward grow ~4x from N to 4N with chunks of 128 queries
    (linear), ~16x with one chunk (quadratic: the negative control)."""
    def temp(n, chunk):
        x = jax.ShapeDtypeStruct((1, 2, n, 16), jnp.float32)
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(softmax_attention(q, k, v, chunk=chunk)),
                             argnums=(0, 1, 2)))
        return f.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    linear = temp(2048, 128) / temp(512, 128)
    quadratic = temp(2048, 2048) / temp(512, 512)
    print(f"temporaries N=512 -> 2048: chunked x{linear:.1f}, one chunk x{quadratic:.1f}")
    assert linear < 6 and quadratic > 10, (linear, quadratic)


def test_kernel_regression_arbitrary_kernel(x64):
    """A Gaussian kernel against a numpy ratio Σκv/Σκ."""
    q, k, v = _qkv("float64")
    gauss = lambda kk, qq: jnp.exp(-0.5 * jnp.sum((kk - qq) ** 2))
    z = kernel_regression(q, k, v, causal=True, kernel=gauss)
    qn, kn, vn = (np.asarray(x) for x in (q, k, v))
    kappa = np.exp(-0.5 * ((kn[:, :, None, :, :] - qn[:, :, :, None, :]) ** 2).sum(-1))  # (B,H,t,s)
    kappa = kappa * np.tril(np.ones((N, N)))
    expected = np.einsum("bhts,bhsv->bhtv", kappa, vn) / kappa.sum(-1)[..., None]
    assert_close(z, expected, 1e-10, "gaussian kernel regression vs numpy")


def test_softmax_scale_argument(x64):
    q, k, v = _qkv("float64")
    z = softmax_attention(q, k, v, causal=False, scale=1.0)
    unscaled = lambda kk, qq: jnp.exp(jnp.dot(kk, qq))
    assert_close(z, kernel_regression(q, k, v, causal=False, kernel=unscaled), 1e-10, "scale=1")
