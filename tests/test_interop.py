"""Imported official trees (ttt.interop) against independent forwards written from the math of
docs/design.md §8–9 and §11.

The references below read the official parameter layout directly (no ttt code) and run the math
token by token: per head, every gradient of a mini-batch at the state it started from,
W_i = W − Σ_{j≤i} η_ij g_j, z_i = q_i + LN(f_res(q_i; W_i)), the carried state from row b − 1.
Sizes: 2 layers, width 32, 2 heads, N = 20 with b = 8 (N not a multiple of b).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, rel_err

from ttt import interop
from ttt.layers import MTTTMixer
from ttt.models import CausalLM, build_model, unstack_layers

VOCAB, LAYERS, WIDTH, HEADS, FFN, MB, N, B = 40, 2, 32, 2, 48, 8, 20, 2
COMBOS = [("transformer", "linear"), ("transformer", "mlp"), ("mamba", "linear"), ("mamba", "mlp")]


# ---------------------------------------------------------------------------- fake official trees

def fake_official_tree(seed=0, *, learner="linear", backbone="mamba", pre_conv=None,
                       attention=False, vocab=VOCAB, layers=LAYERS, width=WIDTH, heads=HEADS,
                       ffn=FFN, mini_batch=MB, conv_width=4):
    """A random ttt-lm-jax CausalLM tree in the official layout (float64 numpy leaves)."""
    rng = np.random.default_rng(seed)
    n = lambda *shape, s=0.3: rng.normal(0.0, s, shape)
    C, H = width, heads
    d = C // H
    pre_conv = (backbone == "mamba" and not attention) if pre_conv is None else pre_conv
    blocks = {}
    for i in range(layers):
        blk = {
            "seq_norm": {"kernel": 1 + n(C, s=0.1)},
            "ffn_norm": {"kernel": 1 + n(C, s=0.1)},
            "feed_forward": {"w1": {"kernel": n(C, ffn)}, "w2": {"kernel": n(ffn, C)},
                             "w3": {"kernel": n(C, ffn)}},
        }
        if pre_conv:
            blk["conv"] = {"conv1": {"kernel": n(conv_width, 1, C), "bias": n(C, s=0.1)},
                           "conv_norm": {"kernel": 1 + n(C, s=0.1)}}
        seq = {name: {"kernel": n(C, C)} for name in ("wq", "wv", "wo")}
        if attention or backbone == "transformer":
            seq["wk"] = {"kernel": n(C, C)}
        if not attention:
            if backbone == "mamba":
                seq["wg"] = {"kernel": n(C, C)}
                for name in ("conv_q", "conv_k"):
                    seq[name] = {"kernel": n(conv_width, 1, C, s=0.5), "bias": n(C, s=0.1)}
            token_idx = n(mini_batch)
            token_idx[3] = -0.6  # 1/4 − 0.6 < 0: the clip at zero is exercised
            h = 4 * d if learner == "mlp" else d
            seq.update({
                "learnable_ttt_lr/kernel": n(H, C, 1, s=0.5),
                "learnable_ttt_lr/bias": n(H, 1),
                "learnable_token_idx": token_idx,
                "ttt_norm/scale": 1 + n(H, d, s=0.2),
                "ttt_norm/bias": n(H, d, s=0.1),
                "post_norm": {"scale": 1 + n(C, s=0.1), "bias": n(C, s=0.1)},
                "ttt_dense_0": n(H, d, h),
                "ttt_bias_0": n(H, 1, h, s=0.1),
            })
            if learner == "mlp":
                seq["ttt_dense_1"] = n(H, h, d)
                seq["ttt_bias_1"] = n(H, 1, d, s=0.1)
        blk["seq_modeling_block"] = seq
        blocks[str(i)] = blk
    model = {"wte": {"embedding": n(vocab, C, s=1.0)}, "h": blocks,
             "ln_f": {"kernel": 1 + n(C, s=0.1)}}
    return {"params": {"model": model}}


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

def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _sub(p, prefix):
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


# numpy (xp=np) outside the one jitted piece below, so the reference compiles almost nothing.
def ref_gelu(x, xp=np):
    return 0.5 * x * (1.0 + xp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def ref_ln(x, scale, bias, eps=1e-6, xp=np):
    mu = x.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True) - mu * mu  # flax's E[x²] − E[x]²
    return (x - mu) / xp.sqrt(var + eps) * scale + bias


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


def _assert_tree_equal(a, b, path=""):
    assert isinstance(a, dict) and isinstance(b, dict), path
    assert set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
    for k in a:
        if isinstance(a[k], dict):
            _assert_tree_equal(a[k], b[k], f"{path}/{k}")
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.dtype == y.dtype and x.shape == y.shape, f"{path}/{k}: {x.dtype}{x.shape}"
            assert np.array_equal(x, y), f"{path}/{k}: values differ"


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
    assert interop._preset_name(dict(num_layers=12, width=768, num_heads=12, ffn_dim=2048)) == \
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


# ---------------------------------------------------------------------------- transformer -> TTT

def _lm_config(mixer, **kwargs):
    # the tiny preset narrowed further, so the training test compiles quickly
    return {**dict(kind="lm", preset="tiny", mixer=mixer, vocab_size=64, width=32, num_heads=2,
                   ffn_dim=64), **kwargs}


def _check_initial(path, leaf):
    """A TTT-only parameter still holds its initial value (zeros, ones or N(0, 0.02²))."""
    name = path.split("/")[-1]
    if name == "scale":
        assert np.all(leaf == 1.0), path
    elif name in ("bias", "learnable_token_idx") or name.startswith("ttt_bias_"):
        assert np.all(leaf == 0.0), path
    else:
        assert leaf.std() < 0.05 or path.endswith(("conv_q/kernel", "conv_k/kernel")), path


def _random_transformer(seed, **kwargs):
    """A softmax-attention LM's variables with random values (as if trained), in its layout."""
    sm = build_model(_lm_config("softmax", **kwargs))
    shapes = jax.eval_shape(sm.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.5, 0.1, s.shape).astype(np.float32), shapes)


@functools.cache
def _converted():
    sm_vars = _random_transformer(7)
    cfg = _lm_config("ttt_linear", mixer_kwargs={"mini_batch": 8, "stats": False})
    return sm_vars, *interop.init_ttt_from_transformer(cfg, sm_vars, seed=1)


def test_init_ttt_from_transformer_copies():
    sm_vars, model, variables = _converted()
    flat_ours = interop._flatten(unstack_layers(variables["params"]))
    flat_theirs = interop._flatten(unstack_layers(sm_vars["params"]))
    expected_shared = {"wte/embedding", "ln_f/kernel"} | {
        f"h/{i}/{name}" for i in range(2) for name in (
            "seq_norm/kernel", "ffn_norm/kernel", "feed_forward/w1/kernel",
            "feed_forward/w2/kernel", "feed_forward/w3/kernel",
            *(f"seq_modeling_block/{w}/kernel" for w in ("wq", "wk", "wv", "wo")))}
    assert set(flat_theirs) == expected_shared  # the softmax LM has nothing else
    for k in expected_shared:
        assert flat_ours[k].dtype == flat_theirs[k].dtype, k
        assert np.array_equal(flat_ours[k], flat_theirs[k]), k
    ttt_only = set(flat_ours) - expected_shared
    assert {p.split("/", 3)[-1] for p in ttt_only} >= {
        "ttt_dense_0", "ttt_bias_0", "learnable_token_idx", "ttt_norm/scale", "post_norm/bias"}
    for k in ttt_only:
        _check_initial(k, np.asarray(flat_ours[k]))
    with pytest.raises(ValueError, match="not the same size"):
        interop.init_ttt_from_transformer(_lm_config("ttt_linear", ffn_dim=32), sm_vars)


@pytest.mark.slow
def test_init_ttt_from_transformer_trains():
    _, model, variables = _converted()
    ids = np.random.default_rng(3).integers(0, 64, (2, 17)).astype(np.int32)

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    opt = optax.adam(3e-3)
    params = variables["params"]
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(6):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
def test_init_ttt_from_transformer_mamba():
    sm_vars = _random_transformer(0, scan_layers=False)
    cfg = _lm_config("ttt_mlp", mixer_kwargs={"backbone": "mamba", "stats": False})
    model, variables = interop.init_ttt_from_transformer(cfg, sm_vars)
    assert model.pre_conv and isinstance(model, nn.Module)
    ours = interop._flatten(unstack_layers(variables["params"]))
    theirs = interop._flatten(sm_vars["params"])
    for k in ("h/1/seq_modeling_block/wq/kernel", "h/1/feed_forward/w2/kernel", "wte/embedding"):
        assert np.array_equal(ours[k], theirs[k]), k
    assert "h/1/seq_modeling_block/wk/kernel" not in ours  # Mamba backbone: no wk to fill
    for k in ("h/1/conv/conv1/bias", "h/1/seq_modeling_block/conv_q/bias"):
        _check_initial(k, np.asarray(ours[k]))  # TTT-only here


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


def write_streaming_checkpoint(path, state, float_dtype=None):
    """A file as ttt-lm-jax's StreamingCheckpointer.save_train_state_to_file writes it: one
    msgpack (key path, flax to_bytes(array)) pair per leaf of the flattened state, floats cast
    to its float_dtype."""
    import msgpack
    from flax import serialization, traverse_util

    packer = msgpack.Packer()
    with open(path, "wb") as f:
        for key, value in traverse_util.flatten_dict(state).items():
            value = np.asarray(value)
            if float_dtype is not None and np.issubdtype(value.dtype, np.floating):
                value = np.asarray(jnp.asarray(value, float_dtype))
            f.write(packer.pack((key, serialization.to_bytes(value))))


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
    assert set(interop._flatten(loaded)) == set(interop._flatten(tree))  # optimizer skipped
    as_bf16 = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16)), tree)
    _assert_tree_equal(loaded, as_bf16)
    _, ours = interop.import_ttt_lm_jax(loaded)
    _, reference = interop.import_ttt_lm_jax(as_bf16)
    _assert_tree_equal(jax.tree.map(np.asarray, ours), jax.tree.map(np.asarray, reference))
    (tmp_path / "garbage").write_bytes(b"\x93not msgpack at all")
    with pytest.raises(ValueError, match="not a ttt-lm-jax"):
        interop.load_ttt_lm_jax_checkpoint(str(tmp_path / "garbage"))
