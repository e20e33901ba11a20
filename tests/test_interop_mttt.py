"""Imported mttt TTTLayers (ttt.interop) against an independent forward written from the math of
docs/design.md §9 and §11: T full-batch gradient steps per head on the layer's own input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err
from official_trees import HEADS, WIDTH, B, _assert_tree_equal, _flat, ref_gelu, ref_ln

from ttt import interop
from ttt.layers import MTTTMixer

# ---------------------------------------------------------------------------- fake official tree

def fake_mttt_tree(seed=0, *, learner="linear", width=WIDTH, heads=HEADS, bias=True,
                   decoder_ln=True):
    """A random mttt TTTLayer dict in the official layout ('/'-containing keys)."""
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=0.3: rng.normal(0.0, s, shape)
    C, H = width, heads
    dh = C // H
    tree = {"psi/kernel": n(H, C, dh), "psi/bias": n(H, dh, s=0.1),
            "phi/kernel": n(H, C, dh), "phi/bias": n(H, dh, s=0.1),
            "g/kernel": n(H, dh, C), "g_bias": n(1, C, s=0.1),
            "h/kernel": n(H, dh, C), "h_bias": n(1, C, s=0.1)}
    widths = [(dh, dh)] if learner == "linear" else [(dh, 4 * dh), (4 * dh, dh)]
    for l, (a, b) in enumerate(widths):
        tree[f"inner_Dense_{l}/kernel"] = n(H, a, b)
        if bias:
            tree[f"inner_Dense_{l}/bias"] = n(H, b, s=0.1)
    if decoder_ln:
        tree["decoder_LN/scale"] = 1 + n(H, C, s=0.2)
        tree["decoder_LN/bias"] = n(H, C, s=0.1)
    return tree



# ---------------------------------------------------------------------------- reference forward

@jax.jit
def ref_mttt_head(p, xs, lrs):
    """One head of the official TTTLayer on one sequence xs (N, C); p: that head's slices."""
    def encode(W, u):
        y = u @ W["k0"] + W.get("b0", 0.0)
        return ref_gelu(y, jnp) @ W["k1"] + W.get("b1", 0.0) if "k1" in W else y

    def loss(W):
        r = encode(W, xs @ p["phi_k"] + p["phi_b"]) @ p["g_k"] + p["g_bias"]
        if "ln_s" in p:
            r = ref_ln(r, p["ln_s"], p["ln_b"], xp=jnp)
        return 0.5 * jnp.mean((r - xs) ** 2) * p["H"]  # = Σ ‖r − x‖² / (2 N dh)

    W = p["W"]
    for t in range(lrs.shape[0]):
        W = jax.tree.map(lambda w, g, t=t: w - lrs[t] * g, W, jax.grad(loss)(W))
    return encode(W, xs @ p["psi_k"] + p["psi_b"]) @ p["h_k"]


def ref_mttt(tree, x, lrs):
    """Official mttt TTTLayer on x (B, N, C): T full-batch GD steps per head (docs/design.md §9)."""
    p = _flat(tree)
    H = p["psi/kernel"].shape[0]
    outs = []
    for xs in x:
        y = p["h_bias"][0]
        for h in range(H):
            W = {"k0": p["inner_Dense_0/kernel"][h]}
            for l in (0, 1):
                if f"inner_Dense_{l}/kernel" in p:
                    W[f"k{l}"] = p[f"inner_Dense_{l}/kernel"][h]
                if f"inner_Dense_{l}/bias" in p:
                    W[f"b{l}"] = p[f"inner_Dense_{l}/bias"][h]
            ph = dict(W=W, H=float(H), phi_k=p["phi/kernel"][h], phi_b=p["phi/bias"][h],
                      psi_k=p["psi/kernel"][h], psi_b=p["psi/bias"][h], g_k=p["g/kernel"][h],
                      g_bias=p["g_bias"][0], h_k=p["h/kernel"][h])
            if "decoder_LN/scale" in p:
                ph.update(ln_s=p["decoder_LN/scale"][h], ln_b=p["decoder_LN/bias"][h])
            y = y + np.asarray(ref_mttt_head(ph, xs, np.asarray(lrs, xs.dtype)))
        outs.append(y)
    return np.stack(outs)


# ---------------------------------------------------------------------------- MTTT

@pytest.mark.parametrize("learner", ["linear", "mlp"])
def test_mttt_parity_x64(x64, learner):
    tree = fake_mttt_tree(learner=learner)
    x = np.random.default_rng(2).normal(size=(B, 12, WIDTH))
    layer, variables = interop.import_mttt_layer(tree, inner_itr=2, inner_lr=(1.0, 0.5, 0.1),
                                                 dtype="float64")
    assert isinstance(layer, MTTTMixer) and layer.learner == learner and layer.steps == 2
    assert layer.lrs == (1.0, 0.5) and layer.mode == "gd"
    y, aux = jax.jit(layer.apply)(variables, x)
    expected = ref_mttt(tree, x, (1.0, 0.5))
    assert_close(y, expected, 1e-10, f"mttt {learner}")
    assert aux["inner_losses"].shape == (3,)
    assert rel_err(ref_mttt(tree, x, (1.0,)), expected) > 1e-3  # the second step matters
    # nested keys and the outer "params" key read the same
    layer2, variables2 = interop.import_mttt_layer(
        {"params": interop.export_mttt_layer(layer, variables, nested=True)}, steps=2,
        lrs=(1.0, 0.5), dtype="float64")
    assert layer2 == layer
    _assert_tree_equal(jax.tree.map(np.asarray, variables2), jax.tree.map(np.asarray, variables))


@pytest.mark.slow
def test_mttt_float32_parity():
    tree = fake_mttt_tree(learner="mlp", bias=False, decoder_ln=False)
    x = np.random.default_rng(2).normal(size=(B, 12, WIDTH)).astype(np.float32)
    layer, variables = interop.import_mttt_layer(tree, steps=2, lrs=(1.0, 0.5))
    assert not layer.inner_bias and not layer.decoder_ln
    y, _ = jax.jit(layer.apply)(variables, x)
    with jax.enable_x64(True):
        expected = np.asarray(ref_mttt(tree, x.astype(np.float64), (1.0, 0.5)))
    err = rel_err(y, expected)
    assert err <= 1e-5, f"mttt float32 vs float64 reference: {err:.2e}"


@pytest.mark.parametrize("learner", ["linear", "mlp"])
def test_mttt_round_trip(learner):
    tree = jax.tree.map(lambda a: a.astype(np.float32), fake_mttt_tree(learner=learner))
    layer, variables = interop.import_mttt_layer(tree, steps=1)
    _assert_tree_equal(interop.export_mttt_layer(layer, variables), tree)


def test_mttt_frozen_zero_w0():
    tree = jax.tree.map(lambda a: a.astype(np.float32), fake_mttt_tree(learner="linear"))
    with pytest.raises(ValueError, match="not all zero"):
        interop.import_mttt_layer(tree, learn_W0=False)
    tree["inner_Dense_0/kernel"] = np.zeros_like(tree["inner_Dense_0/kernel"])
    tree["inner_Dense_0/bias"] = np.zeros_like(tree["inner_Dense_0/bias"])
    layer, variables = interop.import_mttt_layer(tree, learn_W0=False)
    assert "inner_Dense_0" not in variables["params"]
    _assert_tree_equal(interop.export_mttt_layer(layer, variables), tree)


# ---------------------------------------------------------------------------- the official configs

OFFICIAL_TTT = dict(  # the official config_patch.py's config.inner.TTT, with two inner steps
    inner_encoder="mlp_2", inner_itr=2, inner_lr=(1.0, 0.5, 0.1), train_init=True,
    inner_encoder_init="xavier_uniform", inner_encoder_bias=True, decoder_LN=True, SGD=False)


def test_mttt_accepts_the_official_config_dict(x64):
    import ml_collections as mlc

    tree = fake_mttt_tree(learner="mlp")
    x = np.random.default_rng(2).normal(size=(B, 12, WIDTH))
    layer, variables = interop.import_mttt_layer(tree, **mlc.ConfigDict(OFFICIAL_TTT),
                                                 num_heads=HEADS, width=WIDTH, dtype="float64")
    assert layer.learner == "mlp" and layer.steps == 2 and layer.lrs == (1.0, 0.5)
    assert layer.mode == "gd" and layer.learn_W0
    y, _ = jax.jit(layer.apply)(variables, x)
    assert_close(y, ref_mttt(tree, x, (1.0, 0.5)), 1e-10, "official config")
    # train_init=False on a linear encoder whose W0 is zero: the frozen zero W0
    linear = fake_mttt_tree(learner="linear")
    for k in ("inner_Dense_0/kernel", "inner_Dense_0/bias"):
        linear[k] = np.zeros_like(linear[k])
    frozen, fv = interop.import_mttt_layer(linear, **dict(OFFICIAL_TTT, inner_encoder="mlp_1",
                                                          train_init=False))
    assert frozen.learn_W0 is False and "inner_Dense_0" not in fv["params"]


@pytest.mark.parametrize("key,value,named", [
    ("inner_encoder", "mlp_1", "inner_encoder='mlp_1' contradicts the tree"),
    ("inner_encoder", "mlp_3", "inner_encoder='mlp_3': the official encoders"),
    ("inner_encoder_bias", False, "inner_encoder_bias=False contradicts the tree"),
    ("decoder_LN", False, "decoder_LN=False contradicts the tree"),
    ("num_heads", 4, "num_heads=4 contradicts the tree"),
    ("width", 64, "width=64 contradicts the tree"),
])
def test_mttt_names_the_contradicting_key(key, value, named):
    tree = fake_mttt_tree(learner="mlp")
    with pytest.raises(ValueError) as err:
        interop.import_mttt_layer(tree, **{**OFFICIAL_TTT, key: value})
    assert str(err.value).startswith(named) and "\n" not in str(err.value), str(err.value)


