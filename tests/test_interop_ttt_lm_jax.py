"""Imported ttt-lm-jax trees (ttt.interop) against independent forwards written from the math of
docs/design.md §8 and §11.

The references below read the official parameter layout directly (no ttt code) and run the math
token by token: per head, every gradient of a mini-batch at the state it started from,
W_i = W − Σ_{j≤i} η_ij g_j, z_i = q_i + LN(f_res(q_i; W_i)), the carried state from row b − 1.
Sizes: 2 layers, width 32, 2 heads, N = 20 with b = 8 (N not a multiple of b).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err
from official_trees import (
    FFN,
    HEADS,
    LAYERS,
    MB,
    VOCAB,
    WIDTH,
    B,
    N,
    _assert_tree_equal,
    _flat,
    fake_official_tree,
    ref_gelu,
    ref_ln,
    write_streaming_checkpoint,
)

from ttt import interop
from ttt.interop import trees, ttt_lm_jax
from ttt.models import CausalLM

COMBOS = [("transformer", "linear"), ("transformer", "mlp"), ("mamba", "linear"), ("mamba", "mlp")]


# ---------------------------------------------------------------------------- reference forward

def _sub(p, prefix):
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}



def ref_rms(x, g, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def ref_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ref_conv(x, kernel, bias):
    """Causal depthwise conv: y_t = Σ_i x_{t−w+1+i} K[i, 0] + bias; x (N, C), K (w, 1, C)."""
    w = kernel.shape[0]
    xp = np.concatenate([np.zeros((w - 1, x.shape[1]), x.dtype), x])
    return sum(xp[i:i + x.shape[0]] * kernel[i, 0] for i in range(w)) + bias


def ref_rope(x, pos, theta=10000.0):
    """x (N, H, d): pair (x[2i], x[2i+1]) times e^{i·pos·θ^(−2i/d)} as a complex number."""
    d = x.shape[-1]
    ang = pos[:, None] / theta ** (np.arange(0, d, 2) / d)  # (N, d/2)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * ang)[:, None, :]  # (N, H, d/2)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def _f_res(W, u):
    """The official inner model before its LN: x W1 + b1, or gelu_tanh(x W1 + b1) W2 + b2."""
    y = u @ W["W1"] + W["b1"]
    return ref_gelu(y, jnp) @ W["W2"] + W["b2"] if "W2" in W else y


@jax.jit
def ref_minibatch(W, sc, bi, q, k, v, a, c):
    """One head, one mini-batch of m tokens, naive: every W_i materialised.

    q, k, v (m, d); a (m,) gates; c (m,) coefficients c_i. Returns z (m, d) and Σ_j a_j g_j.
    g_j = ∇_W ½‖LN(f_res(k_j; W)) − (v_j − k_j)‖² at the mini-batch's start W,
    W_i = W − c_i Σ_{j≤i} a_j g_j, z_i = q_i + LN(f_res(q_i; W_i)).
    """
    loss = lambda W, k, v: 0.5 * jnp.sum((ref_ln(_f_res(W, k), sc, bi, xp=jnp) - (v - k)) ** 2)
    g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(W, k, v)  # leaves (m, ...)
    col = lambda x, leaf: x.reshape(-1, *[1] * (leaf.ndim - 1))
    cum = jax.tree.map(lambda g: jnp.cumsum(col(a, g) * g, axis=0), g)  # Σ_{j≤i} a_j g_j
    W_i = jax.tree.map(lambda w, s: w[None] - col(c, s) * s, W, cum)  # leaves (m, ...)
    z = jax.vmap(lambda W, q: q + ref_ln(_f_res(W, q), sc, bi, xp=jnp))(W_i, q)
    return z, jax.tree.map(lambda s: s[-1], cum)


def ref_ttt_layer(s, x, base_lr):
    """One official TTT layer on one sequence x (N, C), token-level primal form (design.md §8)."""
    H, d = s["ttt_norm/scale"].shape
    b = s["learnable_token_idx"].shape[0]
    n_tok, C = x.shape
    mamba = "conv_q/kernel" in s
    if mamba:
        xqk = x @ s["wq/kernel"]
        XQ = ref_conv(xqk, s["conv_q/kernel"], s["conv_q/bias"])
        XK = ref_conv(xqk, s["conv_k/kernel"], s["conv_k/bias"])
    else:
        XQ, XK = x @ s["wq/kernel"], x @ s["wk/kernel"]
    XV = (x @ s["wv/kernel"]).reshape(n_tok, H, d)
    pos = np.arange(n_tok) % b
    XQ = ref_rope(XQ.reshape(n_tok, H, d), pos)
    XK = ref_rope(XK.reshape(n_tok, H, d), pos)
    gate = ref_sigmoid(x @ s["learnable_ttt_lr/kernel"][:, :, 0].T
                       + s["learnable_ttt_lr/bias"][:, 0])  # (N, H)
    coef = np.asarray([base_lr * max(1.0 / (i + 1) + float(s["learnable_token_idx"][i]), 0.0)
                        / d for i in range(b)])  # (b,)
    out = []
    for h in range(H):
        W = {"W1": s["ttt_dense_0"][h], "b1": s["ttt_bias_0"][h, 0]}
        if "ttt_dense_1" in s:
            W.update(W2=s["ttt_dense_1"][h], b2=s["ttt_bias_1"][h, 0])
        z_h = []
        for t0 in range(0, n_tok, b):
            t1 = min(t0 + b, n_tok)
            z, total = ref_minibatch(W, s["ttt_norm/scale"][h], s["ttt_norm/bias"][h],
                                     XQ[t0:t1, h], XK[t0:t1, h], XV[t0:t1, h], gate[t0:t1, h],
                                     coef[: t1 - t0])
            z_h.append(np.asarray(z))
            W = jax.tree.map(lambda w, s: w - coef[b - 1] * np.asarray(s), W, total)  # row b−1
        out.append(np.concatenate(z_h))  # (N, d)
    Z = np.stack(out, axis=1).reshape(n_tok, C)  # (N, H, d) -> (N, C), head-major
    Z = ref_ln(Z, s["post_norm/scale"], s["post_norm/bias"])
    if mamba:
        Z = ref_gelu(x @ s["wg/kernel"]) * Z
    return Z @ s["wo/kernel"]


def ref_attention(s, x, H):
    """Causal softmax attention with RoPE at absolute positions on one sequence x (N, C)."""
    n_tok, C = x.shape
    d = C // H
    pos = np.arange(n_tok)
    q = ref_rope((x @ s["wq/kernel"]).reshape(n_tok, H, d), pos)
    k = ref_rope((x @ s["wk/kernel"]).reshape(n_tok, H, d), pos)
    v = (x @ s["wv/kernel"]).reshape(n_tok, H, d)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((n_tok, n_tok), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    z = np.einsum("hqk,khd->qhd", p, v).reshape(n_tok, C)
    return z @ s["wo/kernel"]


def ref_lm(tree, ids, base_lr=None, num_heads=HEADS):
    """Official CausalLM logits (B, N, V) from the official tree, sequence by sequence."""
    p = _sub(_flat(tree), "params/model/")
    L = len({k.split("/")[1] for k in p if k.startswith("h/")})
    E = p["wte/embedding"]
    logits = []
    for seq_ids in np.asarray(ids):
        h = E[seq_ids]
        for i in range(L):
            blk = _sub(p, f"h/{i}/")
            if "conv/conv1/kernel" in blk:
                u = ref_rms(h, blk["conv/conv_norm/kernel"])
                h = h + ref_conv(u, blk["conv/conv1/kernel"], blk["conv/conv1/bias"])
            s = _sub(blk, "seq_modeling_block/")
            u = ref_rms(h, blk["seq_norm/kernel"])
            h = h + (ref_ttt_layer(s, u, base_lr) if "ttt_dense_0" in s
                     else ref_attention(s, u, num_heads))
            u = ref_rms(h, blk["ffn_norm/kernel"])
            u1 = u @ blk["feed_forward/w1/kernel"]
            ff = (u1 * ref_sigmoid(u1) * (u @ blk["feed_forward/w3/kernel"])
                  ) @ blk["feed_forward/w2/kernel"]
            h = h + ff
        logits.append(ref_rms(h, p["ln_f/kernel"]) @ E.T)
    return np.stack(logits)



# ---------------------------------------------------------------------------- helpers

def _ids(seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (B, N)).astype(np.int32)


@functools.cache
def _reference(backbone, learner, base_lr):
    """float64 reference logits for COMBOS, shared by the x64 and float32 tests."""
    with jax.enable_x64(True):
        tree = fake_official_tree(learner=learner, backbone=backbone)
        return np.asarray(ref_lm(tree, _ids(), base_lr))


def _logits64(model, variables, ids):
    """Logits recomputed in float64 from the final RMSNorm output (CausalLM returns float32)."""
    run = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                           mutable=["intermediates"]))
    _, state = run(variables, ids)
    h = np.asarray(state["intermediates"]["ln_f"]["__call__"][0])  # (B, N, C)
    return h @ np.asarray(variables["params"]["wte"]["embedding"]).T  # (B, N, V)


def _flat_equal(a, b):
    """Same leaves at the same '/'-joined paths (nesting of '/'-containing keys ignored)."""
    fa, fb = _flat(a), _flat(b)
    return set(fa) == set(fb) and all(np.array_equal(fa[k], fb[k]) for k in fa)



# ---------------------------------------------------------------------------- LM parity

@pytest.mark.parametrize("backbone,learner", [
    ("transformer", "linear"), ("mamba", "mlp"),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [("transformer", "mlp"),
                                                         ("mamba", "linear")])])
def test_lm_parity_x64(x64, backbone, learner):
    base_lr = 1.0 if learner == "linear" else 0.1
    tree = fake_official_tree(learner=learner, backbone=backbone)
    model, variables = interop.import_ttt_lm_jax(tree, dtype="float64",
                                                 mixer_kwargs={"stats": False})
    assert isinstance(model, CausalLM) and model.mixer == f"ttt_{learner}"
    assert dict(model.mixer_kwargs)["backbone"] == backbone and model.pre_conv == (
        backbone == "mamba")
    expected = _reference(backbone, learner, base_lr)
    assert_close(_logits64(model, variables, _ids()), expected, 1e-10,
                 f"{backbone}/{learner} logits")
    # negative control: the inner loop matters here (another η scale moves the logits)
    assert rel_err(_reference(backbone, learner, 2 * base_lr), expected) > 1e-3


@pytest.mark.parametrize("backbone,learner", [
    ("mamba", "mlp"),
    *(pytest.param(*c, marks=pytest.mark.slow) for c in [("transformer", "linear"),
                                                         ("transformer", "mlp"),
                                                         ("mamba", "linear")])])
def test_lm_parity_float32(backbone, learner):
    base_lr = 1.0 if learner == "linear" else 0.1
    tree = fake_official_tree(learner=learner, backbone=backbone)
    model, variables = interop.import_ttt_lm_jax(tree, mixer_kwargs={"stats": False})
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    logits, _ = jax.jit(model.apply)(variables, _ids())
    err = rel_err(logits, _reference(backbone, learner, base_lr))
    assert err <= 1e-5, f"float32 logits vs float64 reference: relative error {err:.2e}"


def test_attention_lm_parity_x64(x64):
    tree = fake_official_tree(attention=True, pre_conv=False)
    model, variables = interop.import_ttt_lm_jax(tree, dtype="float64", num_heads=HEADS)
    assert model.mixer == "softmax"
    expected = ref_lm(tree, _ids(), num_heads=HEADS)
    assert_close(_logits64(model, variables, _ids()), expected, 1e-10, "self-attention logits")
    assert rel_err(ref_lm(tree, _ids(), num_heads=1), expected) > 1e-3  # heads matter


def test_inferred_config():
    tree = fake_official_tree(learner="mlp", backbone="transformer", pre_conv=True,
                              conv_width=3)
    cfg = interop.ttt_lm_jax_config(tree, ttt_base_lr=0.05, rms_norm_eps=1e-5)
    assert (cfg.num_layers, cfg.width, cfg.num_heads, cfg.ffn_dim, cfg.vocab_size) == (
        LAYERS, WIDTH, HEADS, FFN, VOCAB)
    assert cfg.mixer == "ttt_mlp" and cfg.pre_conv and cfg.conv_width == 3
    assert dict(cfg.mixer_kwargs) == dict(backbone="transformer", mini_batch=MB, base_lr=0.05,
                                          mlp_factor=4)
    model, variables = interop.import_ttt_lm_jax(tree, ttt_base_lr=0.05, rms_norm_eps=1e-5)
    assert model.conv_width == 3 and model.norm_eps == 1e-5
    assert ttt_lm_jax._preset_name(dict(num_layers=12, width=768, num_heads=12, ffn_dim=2048)) == \
        "125m"


# ---------------------------------------------------------------------------- LM round trip

@pytest.mark.parametrize("backbone,learner,scan", [
    ("transformer", "linear", False), ("transformer", "mlp", True), ("mamba", "linear", True),
    ("mamba", "mlp", False), ("attention", None, True)])
def test_lm_round_trip(backbone, learner, scan):
    attention = backbone == "attention"
    tree = fake_official_tree(learner=learner or "linear", backbone="transformer" if attention
                              else backbone, attention=attention)
    tree = jax.tree.map(lambda a: a.astype(np.float32), tree)
    heads = {"num_heads": HEADS} if attention else {}
    model, variables = interop.import_ttt_lm_jax(tree, scan_layers=scan, **heads)
    _assert_tree_equal(interop.export_ttt_lm_jax(model, variables), tree)
    # from a config instead of a model, without the outer key, nested multi-head groups
    cfg = interop.ttt_lm_jax_config(tree, scan_layers=scan, **heads)
    nested = interop.export_ttt_lm_jax(cfg, variables, params_key=False, nested=True)
    assert isinstance(nested["model"]["h"]["0"]["seq_modeling_block"]["wq"], dict)
    assert _flat_equal(nested, tree["params"])


def test_lm_literal_keys_are_official():
    tree = fake_official_tree(learner="linear", backbone="mamba")
    model, variables = interop.import_ttt_lm_jax(tree)
    seq = interop.export_ttt_lm_jax(model, variables)["params"]["model"]["h"]["0"][
        "seq_modeling_block"]
    assert "learnable_ttt_lr/kernel" in seq and "ttt_norm/scale" in seq
    assert seq["ttt_bias_0"].shape == (HEADS, 1, WIDTH // HEADS)
    nested = interop.export_ttt_lm_jax(model, variables, nested=True)["params"]["model"]["h"]["0"]
    assert set(nested["seq_modeling_block"]["ttt_norm"]) == {"scale", "bias"}


def test_lm_import_errors():
    tree = fake_official_tree(learner="linear", backbone="mamba")
    with pytest.raises(ValueError, match="unknown override"):
        interop.import_ttt_lm_jax(tree, base_lr=1.0)
    untied = {"params": dict(tree["params"], lm_head={"kernel": np.zeros((WIDTH, VOCAB))})}
    with pytest.raises(ValueError, match="lm_head"):
        interop.import_ttt_lm_jax(untied)
    bad = fake_official_tree(learner="linear", backbone="mamba")
    bad["params"]["model"]["h"]["1"]["seq_modeling_block"]["ttt_dense_0"] = np.zeros((2, 16, 8))
    with pytest.raises(ValueError, match="ttt_dense_0"):
        interop.import_ttt_lm_jax(bad)
    with pytest.raises(ValueError, match="num_heads"):
        interop.import_ttt_lm_jax(fake_official_tree(attention=True, width=24, heads=2))
    with pytest.raises(ValueError, match="learn_eta"):
        cfg = dict(kind="lm", preset="tiny", mixer="ttt_linear",
                   mixer_kwargs={"learn_eta": False, "mini_batch": 4})
        interop.export_ttt_lm_jax(cfg, {})
    with pytest.raises(ValueError, match="no ttt-lm-jax counterpart"):
        interop.export_ttt_lm_jax(dict(kind="lm", preset="tiny", mixer="linear_attention"), {})



def test_official_checkpoint_file(tmp_path):
    tree = jax.tree.map(lambda a: a.astype(np.float32),
                        fake_official_tree(learner="linear", backbone="mamba"))
    params_file, state_file = tmp_path / "streaming_params", tmp_path / "streaming_train_state"
    write_streaming_checkpoint(params_file, tree["params"])  # params only: model/...
    adam = jax.tree.map(np.zeros_like, tree)
    write_streaming_checkpoint(state_file, {"step": np.int32(7), "params": tree,
                                            "opt_state": {"0": {"mu": adam, "nu": adam}}},
                               float_dtype=jnp.bfloat16)  # the official default float_dtype
    _assert_tree_equal(interop.load_ttt_lm_jax_checkpoint(str(params_file)), tree)
    loaded = interop.load_ttt_lm_jax_checkpoint(str(state_file))
    assert set(trees.flatten(loaded)) == set(trees.flatten(tree))  # optimizer skipped
    as_bf16 = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)), tree)
    _assert_tree_equal(loaded, as_bf16)
    _, ours = interop.import_ttt_lm_jax(loaded)
    _, reference = interop.import_ttt_lm_jax(as_bf16)
    _assert_tree_equal(jax.tree.map(np.asarray, ours), jax.tree.map(np.asarray, reference))
    (tmp_path / "garbage").write_bytes(b"\x93not msgpack at all")
    with pytest.raises(ValueError, match="not a ttt-lm-jax"):
        interop.load_ttt_lm_jax_checkpoint(str(tmp_path / "garbage"))
