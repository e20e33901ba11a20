"""Inner learners: formulas against independent references (flax LayerNorm, numpy), init stats."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ttt.ops import learners as L


def _np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _np_layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True) - mean**2  # flax: E[x²] − E[x]²
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_layer_norm_matches_flax_and_numpy(x64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 8)) * 3.0 + 1.5
    scale, bias = rng.normal(size=8), rng.normal(size=8)
    ours = L.layer_norm(jnp.asarray(x), scale, bias, 1e-6)
    ln = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float64, param_dtype=jnp.float64)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    assert_close(ours, ln.apply(params, jnp.asarray(x)), 1e-12, "layer_norm vs flax")
    assert_close(ours, _np_layer_norm(x, scale, bias, 1e-6), 1e-12, "layer_norm vs numpy")
    # negative control: a different eps is visible on near-constant rows
    flat = jnp.full((1, 8), 2.0).at[0, 0].add(1e-3)
    assert not np.allclose(L.layer_norm(flat, 1.0, 0.0, 1e-6), L.layer_norm(flat, 1.0, 0.0, 1e-2))


def test_gelu_is_tanh_approximation(x64):
    x = np.linspace(-5, 5, 101)
    assert_close(L.gelu_tanh(jnp.asarray(x)), _np_gelu_tanh(x), 1e-14, "gelu_tanh")
    exact = jax.nn.gelu(jnp.asarray(x), approximate=False)
    assert np.max(np.abs(np.asarray(exact) - _np_gelu_tanh(x))) > 1e-5  # it is not the erf form


@pytest.mark.parametrize("bias", [True, False])
def test_linear_init_and_apply(x64, bias):
    lrn = L.linear(bias=bias, init_scale=0.1)
    W = lrn.init(jax.random.PRNGKey(0), 64)
    assert set(W) == ({"W1", "b1"} if bias else {"W1"})
    assert W["W1"].shape == (64, 64)
    assert abs(float(jnp.std(W["W1"])) - 0.1) < 0.01
    if bias:
        W["b1"] = jnp.arange(64.0)
        assert W["b1"].shape == (64,)
    x = np.random.default_rng(1).normal(size=(2, 3, 64))
    want = x @ np.asarray(W["W1"]) + (np.asarray(W["b1"]) if bias else 0.0)
    assert_close(lrn.apply(W, jnp.asarray(x), None), want, 1e-13, "linear apply")
    assert lrn.dense == (("W1", "b1" if bias else None),) and lrn.post is None
    assert L.linear(d_out=5).init(jax.random.PRNGKey(0), 3)["W1"].shape == (3, 5)


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_init_and_apply(x64, bias):
    lrn = L.mlp(factor=4, bias=bias)
    W = lrn.init(jax.random.PRNGKey(0), 6)
    assert W["W1"].shape == (6, 24) and W["W2"].shape == (24, 6)
    assert not np.allclose(W["W1"][:6, :6], W["W2"][:6, :6])  # independent draws
    rng = np.random.default_rng(2)
    if bias:
        assert not np.any(W["b1"]) and W["b2"].shape == (6,)
        W = dict(W, b1=jnp.asarray(rng.normal(size=24)), b2=jnp.asarray(rng.normal(size=6)))
    x = rng.normal(size=(5, 6))
    Wn = {n: np.asarray(w) for n, w in W.items()}
    h = x @ Wn["W1"] + (Wn["b1"] if bias else 0.0)
    want = _np_gelu_tanh(h) @ Wn["W2"] + (Wn["b2"] if bias else 0.0)
    assert_close(lrn.apply(W, jnp.asarray(x), None), want, 1e-13, "mlp apply")


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_ln_residual_apply_loss_and_chain(x64, inner):
    base = L.linear() if inner == "linear" else L.mlp()
    lrn = L.ln_residual(base)
    rng = np.random.default_rng(3)
    W = jax.tree_util.tree_map(
        lambda w: jnp.asarray(rng.normal(size=w.shape)), base.init(jax.random.PRNGKey(0), 4)
    )
    fixed = {"scale": jnp.asarray(rng.normal(size=4)), "bias": jnp.asarray(rng.normal(size=4))}
    k, v = rng.normal(size=4), rng.normal(size=4)
    inner_k = np.asarray(base.apply(W, jnp.asarray(k), None))
    ln_k = _np_layer_norm(inner_k, np.asarray(fixed["scale"]), np.asarray(fixed["bias"]), 1e-6)
    assert_close(lrn.apply(W, jnp.asarray(k), fixed), k + ln_k, 1e-13, "x + LN(inner(x))")
    # the residual turns the target of LN(inner(k)) into v − k (docs/design.md §3.3)
    want = 0.5 * np.sum((ln_k - (v - k)) ** 2)
    assert_close(L.reconstruction_loss(lrn, W, fixed, k, v), want, 1e-13, "loss")
    # the dual-form description reproduces apply: dense chain, activation between, then post
    h = jnp.asarray(k)
    for idx, (w_name, b_name) in enumerate(lrn.dense):
        h = (lrn.activation(h) if idx > 0 else h) @ W[w_name] + W[b_name]
    assert_close(lrn.post(jnp.asarray(k), h, fixed), lrn.apply(W, k, fixed), 1e-14, "chain")
    with pytest.raises(ValueError, match="fixed"):
        lrn.apply(W, k, None)


def test_init_fixed_ln_and_plain_loss():
    fixed = L.init_fixed_ln(5)
    assert_close(fixed["scale"], np.ones(5), 0.0, "scale")
    assert_close(fixed["bias"], np.zeros(5), 0.0, "bias")
    W = {"W1": jnp.eye(3) * 2.0, "b1": jnp.ones(3)}
    k, v = jnp.array([1.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 0.0])
    # f(k) = 2k + 1 = (3, 1, -1): ½ (9 + 1 + 1)
    assert float(L.reconstruction_loss(L.linear(), W, None, k, v)) == pytest.approx(5.5)


def test_ln_residual_of_post_learner_has_no_dual():
    wrapped = L.ln_residual(L.ln_residual(L.linear()))
    assert wrapped.dense is None and wrapped.post is None
