"""The official layouts the interop tests share: a fake ttt-lm-jax tree, a streaming checkpoint
file as ttt-lm-jax writes it, and the numpy pieces of the reference forwards (docs/design.md §11).

Sizes: 2 layers, width 32, 2 heads, N = 20 with b = 8 (N not a multiple of b).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

VOCAB, LAYERS, WIDTH, HEADS, FFN, MB, N, B = 40, 2, 32, 2, 48, 8, 20, 2


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



# ---------------------------------------------------------------------------- reference pieces

def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# numpy (xp=np) outside the one jitted piece below, so the reference compiles almost nothing.
def ref_gelu(x, xp=np):
    return 0.5 * x * (1.0 + xp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def ref_ln(x, scale, bias, eps=1e-6, xp=np):
    mu = x.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True) - mu * mu  # flax's E[x²] − E[x]²
    return (x - mu) / xp.sqrt(var + eps) * scale + bias


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

