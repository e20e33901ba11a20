"""ttt.models: config validation, preset parameter counts, LM layer layouts, remat and bf16.

Parameter counts are checked against formulas written out here from the papers' dimensions
(docs/design.md §10.3), computed with `jax.eval_shape` so the 1.3B presets cost no memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt import models
from ttt.layers import MIXERS
from ttt.models import PRESETS, build_model, param_count, stack_layers, unstack_layers

LM_MIXERS = ["ttt_linear", "ttt_mlp", "ttt_linear_mamba", "softmax", "linear_attention"]
VIT_MIXERS = ["mttt_mlp", "mttt_linear", "softmax"]
MINI_BATCH = 16  # TTT-LM's b, the length of the learnable per-position lr offset


def lm_config(**kw) -> ml_collections.ConfigDict:
    cfg = dict(kind="lm", preset="tiny", mixer="linear_attention", mixer_kwargs={},
               dtype="float32", scan_layers=True, remat="none", vocab_size=None)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def vit_config(**kw) -> ml_collections.ConfigDict:
    cfg = dict(kind="vit", preset="tiny", mixer="mttt_mlp", mixer_kwargs={}, dtype="float32",
               scan_layers=True, remat="none", num_classes=10, image_size=32, patch_size=16,
               channels=3)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


# ---------------------------------------------------------------- parameter-count formulas
def pre_conv(mixer: str) -> bool:
    """The registry's pre-conv field at the entry's defaults: on exactly for the Mamba backbone."""
    spec = MIXERS[mixer]
    return spec.pre_conv(spec.attrs())


def lm_mixer_params(mixer: str, C: int, H: int) -> int:
    d = C // H
    if mixer in ("softmax", "linear_attention"):
        return 4 * C * C  # wq, wk, wv, wo, no biases
    mamba = pre_conv(mixer)  # the Mamba backbone
    proj = 4 * C * C  # transformer: wq wk wv wo; mamba: wq wv wo + gate wg
    convs = 2 * (4 * C + C) if mamba else 0  # conv_q, conv_k: depthwise width 4 + bias
    lr_gate = H * C + H  # per-head Dense C -> 1 with bias (η's token-dependent part)
    lr_offset = MINI_BATCH  # learnable offset per position in the mini-batch
    ttt_norm = 2 * H * d  # per-head LayerNorm inside f
    post_norm = 2 * C
    if MIXERS[mixer].attrs()["learner"] == "linear":
        inner = H * (d * d + d)  # W1, b1
    else:
        inner = H * (d * 4 * d + 4 * d + 4 * d * d + d)  # W1, b1, W2, b2
    return proj + convs + lr_gate + lr_offset + ttt_norm + post_norm + inner


def lm_params(preset: str, mixer: str) -> int:
    p = PRESETS["lm"][preset]
    C, H, F, L, V = p["width"], p["num_heads"], p["ffn_dim"], p["num_layers"], p["vocab_size"]
    block = 2 * C + 3 * C * F + lm_mixer_params(mixer, C, H)  # seq/ffn RMSNorm, SwiGLU, mixer
    if pre_conv(mixer):
        block += C + 4 * C + C  # pre-conv: RMSNorm, depthwise kernel, bias
    return V * C + L * block + C  # tied embedding, blocks, ln_f


def vit_mixer_params(mixer: str, C: int, H: int) -> int:
    dh = C // H
    if mixer == "softmax":
        return 4 * (C * C + C)  # non-causal twin: wq wk wv wo with biases
    n = 2 * (H * C * dh + H * dh)  # ψ, φ with biases
    n += 2 * H * dh * C + 2 * C  # g, h per head + shared biases
    n += 2 * H * C  # per-head decoder LayerNorm over C
    if mixer == "mttt_mlp":
        n += H * (dh * 4 * dh + 4 * dh + 4 * dh * dh + dh)  # learned W0 of the inner MLP
    return n  # MTTT-Linear's W0 is fixed at zero: no parameters


def vit_params(preset: str, mixer: str, *, image: int = 224, patch: int = 16, ch: int = 3,
               classes: int = 1000) -> int:
    p = PRESETS["vit"][preset]
    C, H, M, L = p["width"], p["num_heads"], p["mlp_dim"], p["num_layers"]
    n = (patch or 1) ** 2 * ch * C + C  # patch (or pixel) embedding
    if not patch:
        n += image * image * C  # learned position embedding, one per pixel
    block = 4 * C + (C * M + M + M * C + C) + vit_mixer_params(mixer, C, H)  # 2 LN, MLP, mixer
    return n + L * block + 2 * C + (C * C + C) + (C * classes + classes)  # norm, pre_logits, head


def shapes_lm(cfg):
    model = build_model(cfg)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MINI_BATCH), jnp.int32))


@pytest.mark.parametrize("preset", list(PRESETS["lm"]))
@pytest.mark.parametrize("mixer", LM_MIXERS)
def test_lm_param_count(preset, mixer):
    shapes = shapes_lm(lm_config(preset=preset, mixer=mixer))
    assert param_count(shapes) == lm_params(preset, mixer)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize("preset", list(PRESETS["vit"]))
@pytest.mark.parametrize("mixer", VIT_MIXERS)
def test_vit_param_count(preset, mixer):
    cfg = vit_config(preset=preset, mixer=mixer, image_size=224, num_classes=1000)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert param_count(shapes) == vit_params(preset, mixer)


def test_vit_pixel_param_count():
    cfg = vit_config(patch_size=0, image_size=8)
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    assert param_count(shapes) == vit_params("tiny", "mttt_mlp", image=8, patch=0, classes=10)


def test_paper_sizes_are_in_range():
    """The presets land on the papers' nominal sizes (TTT-Linear, Mamba backbone)."""
    for preset, nominal in [("125m", 125e6), ("350m", 350e6), ("760m", 760e6), ("1.3b", 1.3e9)]:
        n = lm_params(preset, "ttt_linear_mamba")
        assert 0.8 * nominal < n < 1.2 * nominal, (preset, n)


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize("field,value,needle", [
    ("kind", "rnn", "model.kind: unknown 'rnn'; known: lm, vit"),
    ("preset", "7b", "model.preset: unknown '7b'; known: tiny, 125m, 350m, 760m, 1.3b"),
    ("mixer", "retnet", "model.mixer: unknown 'retnet'; known:"),
    ("dtype", "float16", "model.dtype: unknown 'float16'"),
    ("remat", "everything", "model.remat: unknown 'everything'; known: none, block"),
    ("num_heads", 5, "width 64 is not divisible by num_heads 5"),
    ("vocab_size", 0, "model.vocab_size must be a positive int"),
])
def test_build_model_rejects_bad_fields(field, value, needle):
    with pytest.raises(ValueError) as e:
        build_model(lm_config(**{field: value}))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    if field == "mixer":
        assert "ttt_linear" in msg and "softmax" in msg


def test_build_vit_rejects_bad_patch():
    with pytest.raises(ValueError, match="model.patch_size must be 0"):
        build_model(vit_config(patch_size=5))


def test_build_model_fields():
    m = build_model(lm_config(mixer="ttt_linear_mamba", dtype="bfloat16", remat="block",
                              scan_layers=False, mixer_kwargs={"mini_batch": 4}))
    assert isinstance(m, models.CausalLM)
    assert m.pre_conv and m.dtype == jnp.bfloat16 and m.param_dtype == jnp.float32
    assert m.vocab_size == 256 and m.num_layers == 2 and not m.scan_layers
    assert dict(m.mixer_kwargs) == {"mini_batch": 4}
    assert not build_model(lm_config(mixer="ttt_linear")).pre_conv
    v = build_model(vit_config(mixer="softmax"))
    assert isinstance(v, models.ViT) and v.mixer == "softmax_noncausal"


# ---------------------------------------------------------------- layouts, remat, dtype
B, N, V = 2, 12, 32
SMALL = dict(width=16, num_heads=2, ffn_dim=32, vocab_size=V, pre_conv=True)
# Tiny graphs: compile time dominates, so trade XLA optimisation for compile speed.
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


@pytest.fixture(scope="module")
def ids():
    return jax.random.randint(jax.random.key(0), (B, N), 0, V)


@pytest.fixture(scope="module")
def layouts(ids):
    """One compilation computing the same LM in every layout / remat / dtype variant."""
    model = build_model(lm_config(**SMALL))
    unrolled = build_model(lm_config(**SMALL, scan_layers=False))
    bf16 = build_model(lm_config(**SMALL, dtype="bfloat16"))
    rematted = [(build_model(lm_config(**SMALL, remat=r, scan_layers=scan)), scan)
                for r, scan in [("block", True), ("block_dots", False)]]

    def loss_and_grad(m, params):
        return jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, ids)[0] ** 2))(params)

    def run(key):
        variables = model.init(key, ids)
        p = variables["params"]
        flat = unstack_layers(p)
        swapped = dict(flat, h={"0": flat["h"]["1"], "1": flat["h"]["0"]})
        out = dict(variables=variables, forward=model.apply(variables, ids),
                   unrolled=unrolled.apply({"params": flat}, ids)[0],
                   swapped=unrolled.apply({"params": swapped}, ids)[0],
                   bf16=bf16.apply(variables, ids)[0], grad=loss_and_grad(model, p))
        for m, scan in rematted:
            loss, g = loss_and_grad(m, p if scan else flat)
            out[f"grad_{m.remat}"] = (loss, g if scan else stack_layers(g))
        return out

    return fast_jit(run)(jax.random.key(1, impl="rbg"))


def test_forward_shapes_and_tree(layouts):
    logits, aux = layouts["forward"]
    assert logits.shape == (B, N, V) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert aux == {}  # linear attention reports no diagnostics
    p = layouts["variables"]["params"]
    assert set(p) == {"wte", "h", "ln_f"}
    assert set(p["h"]) == {"conv", "seq_norm", "seq_modeling_block", "ffn_norm", "feed_forward"}
    assert set(p["h"]["feed_forward"]) == {"w1", "w2", "w3"}
    assert set(p["h"]["conv"]) == {"conv1", "conv_norm"}
    assert p["h"]["seq_norm"]["kernel"].shape == (2, 16)  # stacked on the layer axis
    assert abs(float(jnp.std(p["wte"]["embedding"])) - 0.02) < 0.004  # N(0, 0.02)


def test_scan_equals_unrolled(layouts, ids):
    logits = layouts["forward"][0]
    params = layouts["variables"]["params"]
    flat = unstack_layers(params)
    assert set(flat["h"]) == {"0", "1"}
    unrolled = build_model(lm_config(**SMALL, scan_layers=False))
    ref_tree = jax.eval_shape(unrolled.init, jax.random.key(1), ids)["params"]
    assert jax.tree.structure(ref_tree) == jax.tree.structure(flat)
    assert jax.tree.map(jnp.shape, ref_tree) == jax.tree.map(jnp.shape, flat)
    assert_close(layouts["unrolled"], logits, 1e-6, "unrolled vs scanned logits")
    assert_close(stack_layers(flat), params, 0.0, "stack(unstack(p)) == p")
    assert rel_err(layouts["swapped"], logits) > 1e-3  # negative control: layer order matters


@pytest.mark.parametrize("remat", ["block", "block_dots"])
def test_remat_same_logits_and_grads(layouts, remat):
    loss, grads = layouts["grad"]
    assert_close(loss, jnp.mean(layouts["forward"][0] ** 2), 1e-6, "loss")
    r_loss, r_grads = layouts[f"grad_{remat}"]
    assert_close(r_loss, loss, 1e-6, f"remat={remat} loss")
    assert_close(r_grads, grads, 1e-5, f"remat={remat} grads")


def test_bfloat16_close_to_float32(layouts, ids):
    model = build_model(lm_config(**SMALL, dtype="bfloat16"))
    shapes = jax.eval_shape(model.init, jax.random.key(1), ids)
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes))  # params stay float32
    out = layouts["bf16"]
    assert out.dtype == jnp.float32
    err = rel_err(out, layouts["forward"][0])
    assert 0 < err < 5e-2, err


def test_param_count_counts_arrays_and_shapes(layouts):
    variables = layouts["variables"]
    n = param_count(variables)
    assert n == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables))
    assert n == param_count(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         variables))
