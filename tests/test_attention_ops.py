"""Attention ops: softmax == kernel regression (E4); linear attention forms agree with each other
and with numpy references; decoding == the causal forward; causality; gradients; shape errors."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.ops.attention import (
    cudnn_applies,
    kernel_regression,
    linear_attention,
    linear_attention_decode_step,
    linear_attention_init_state,
    softmax_attention,
)

B, H, N, D, DV = 2, 2, 13, 8, 6  # N = 13 is not a multiple of the chunk sizes used below
TOL = {"float64": 1e-10, "float32": 1e-5}


def _qkv(dtype, seed=0, n=N):
    # numpy draws: jax.random compiles per shape, which dominates a small CPU test
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, n, w)) for w in (D, D, DV))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _np_phi(x, feature_map):
    x = np.asarray(x, np.float64)
    return x if feature_map is None else np.where(x > 0, x + 1.0, np.exp(x))


def _np_linear_attention(q, k, v, causal, feature_map, normalize, eps=1e-6):
    """Token loop in float64 numpy: z_t = Σ_s v_s (φ(k_s)·φ(q_t)) [/ normaliser]."""
    fq, fk, v = _np_phi(q, feature_map), _np_phi(k, feature_map), np.asarray(v, np.float64)
    z = np.zeros(v.shape)
    n = q.shape[2]
    for t in range(n):
        seen = t + 1 if causal else n
        w = np.einsum("bhd,bhsd->bhs", fq[:, :, t], fk[:, :, :seen])  # (B, H, seen)
        num = np.einsum("bhs,bhsv->bhv", w, v[:, :, :seen])  # (B, H, dv)
        if normalize == "adaptive":
            num = num / (w.sum(-1) + eps)[..., None]
        elif normalize == "constant":
            num = num / seen
        z[:, :, t] = num
    return z


def _np_softmax_attention(q, k, v, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhts,bhsv->bhtv", w / w.sum(-1, keepdims=True), v)  # (B, H, N, dv)


# ----------------------------------------------------------------------------- E4


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


# ----------------------------------------------------------------------------- linear attention

COMBOS = list(itertools.product([None, "elu"], [None, "adaptive", "constant"]))
FORMS = ("quadratic", "cumsum", "chunked")


def _tol(feature_map, normalize):
    # φ = identity lets the adaptive denominator Σ φ(k)·φ(q) come near zero, which amplifies
    # rounding; every form computes the same formula with the same eps.
    return 1e-8 if normalize == "adaptive" and feature_map is None else 1e-10


def _key(causal, feature_map, normalize, form) -> str:
    return f"causal={causal} feature_map={feature_map} normalize={normalize} form={form}"


@jax.jit
def _all_linear_variants(q, k, v):
    """{(causal, feature_map, normalize, form): z}, one compile (one per variant is slow on CPU)."""
    return {
        _key(causal, fm, nm, form): linear_attention(
            q, k, v, causal=causal, feature_map=fm, normalize=nm, form=form, chunk=5
        )
        for causal in (True, False)
        for fm, nm in COMBOS
        for form in FORMS
    }


def test_linear_attention_forms_agree_causal(x64):
    """chunked (c = 5, N = 13) == cumsum == quadratic == numpy token loop, every φ × normaliser."""
    q, k, v = _qkv("float64", seed=1)
    outs = _all_linear_variants(q, k, v)
    for fm, nm in COMBOS:
        what = f"causal feature_map={fm} normalize={nm}"
        expected = _np_linear_attention(q, k, v, True, fm, nm)
        quad = outs[_key(True, fm, nm, "quadratic")]
        assert_close(quad, expected, _tol(fm, nm), f"{what}: quadratic vs numpy loop")
        for form in ("cumsum", "chunked"):
            assert_close(outs[_key(True, fm, nm, form)], quad, _tol(fm, nm), f"{what}: {form}")


def test_linear_attention_noncausal_equals_einsum(x64):
    q, k, v = _qkv("float64", seed=1)
    outs = _all_linear_variants(q, k, v)
    for fm, nm in COMBOS:
        fq, fk = _np_phi(q, fm), _np_phi(k, fm)
        S = np.einsum("bhsd,bhsv->bhdv", fk, np.asarray(v))  # (B, H, d, dv) global state
        expected = np.einsum("bhtd,bhdv->bhtv", fq, S)  # (B, H, N, dv)
        if nm == "adaptive":
            expected = expected / (np.einsum("bhtd,bhd->bht", fq, fk.sum(2)) + 1e-6)[..., None]
        elif nm == "constant":
            expected = expected / N
        for form in FORMS:
            z = outs[_key(False, fm, nm, form)]
            assert_close(z, expected, _tol(fm, nm), f"non-causal {form} φ={fm} norm={nm}")
        # Negative control: the causal sum is a different operator.
        assert rel_err(outs[_key(True, fm, nm, "quadratic")], expected) > 1e-2


def test_linear_attention_chunk_invariance(x64):
    q, k, v = _qkv("float64", seed=1)
    kw = dict(causal=True, feature_map="elu", normalize="adaptive")
    expected = _np_linear_attention(q, k, v, True, "elu", "adaptive")
    chunks = (1, N, 64)  # one token, exactly N, past the end (5 is in the test above)
    outs = jax.jit(
        lambda q, k, v: [linear_attention(q, k, v, form="chunked", chunk=c, **kw) for c in chunks]
    )(q, k, v)
    for chunk, z in zip(chunks, outs, strict=True):
        assert_close(z, expected, 1e-10, f"chunked(c={chunk}) vs numpy loop")


def test_linear_attention_float32(x64):
    q, k, v = _qkv("float32", seed=3)
    expected = _np_linear_attention(q, k, v, True, "elu", "adaptive")
    outs = jax.jit(
        lambda q, k, v: [
            linear_attention(q, k, v, form=f, chunk=4, feature_map="elu", normalize="adaptive")
            for f in FORMS
        ]
    )(q, k, v)
    for form, z in zip(FORMS, outs, strict=True):
        assert z.dtype == jnp.float32
        assert_close(z, expected, 1e-5, f"float32 {form} vs float64 numpy")


def test_linear_attention_decode_equals_forward(x64):
    q, k, v = _qkv("float64", seed=4)

    @jax.jit
    def decode_all(q, k, v):
        """Token-by-token decoding as a scan over t, for every φ × normaliser: one compile."""
        tokens = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))  # (N, B, H, ·) each
        outs = {}
        for fm, nm in COMBOS:

            def step(state, xs, fm=fm, nm=nm):
                q_t, k_t, v_t, t = xs
                return linear_attention_decode_step(
                    state, q_t, k_t, v_t, feature_map=fm, normalize=nm, position=t
                )[::-1]

            state0 = linear_attention_init_state(B, H, D, DV, jnp.float64)
            state, zs = jax.lax.scan(step, state0, (*tokens, jnp.arange(N)))
            outs[f"{fm}-{nm}"] = (jnp.moveaxis(zs, 0, 2), state)  # (B, H, N, dv)
        return outs

    forward = _all_linear_variants(q, k, v)
    decoded = decode_all(q, k, v)
    for fm, nm in COMBOS:
        z, state = decoded[f"{fm}-{nm}"]
        full = forward[_key(True, fm, nm, "quadratic")]
        assert_close(z, full, _tol(fm, nm), f"decode steps vs causal forward φ={fm} norm={nm}")
        S = np.einsum("bhsd,bhsv->bhdv", _np_phi(k, fm), np.asarray(v))  # (B, H, d, dv)
        assert_close(state["S"], S, 1e-10, "final decode state")


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
