"""ViT classifier: patch and pixel tokens, zero-init head, stacked aux, SGD-mode inner RNG,
scan vs unrolled layers."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.models import build_model, unstack_layers
from ttt.models.vit import posemb_sincos_2d

B, K = 2, 5  # batch, classes


def config(**kw) -> ml_collections.ConfigDict:
    cfg = dict(kind="vit", preset="tiny", mixer="mttt_mlp", mixer_kwargs={}, dtype="float32",
               scan_layers=True, remat="none", num_classes=K, image_size=8, patch_size=4,
               channels=3, width=16, num_heads=2, mlp_dim=32)
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def images(size: int) -> jax.Array:
    return jax.random.normal(jax.random.key(0), (B, size, size, 3))


# Tiny graphs: compile time dominates, so trade XLA optimisation for compile speed.
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def with_random_head(params):
    """Replace the zero-initialised head kernel by a random one (so logits depend on the input)."""
    head = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
    return {**params, "head": {**params["head"], "kernel": head}}


@pytest.mark.parametrize("patch,size,tokens", [(4, 8, 4), (0, 4, 16)], ids=["patches", "pixels"])
def test_shapes_zero_init_head_and_aux(patch, size, tokens):
    model = build_model(config(patch_size=patch, image_size=size))
    x = images(size)

    def run(key):
        variables = model.init(key, x)
        moved = {"params": with_random_head(variables["params"])}
        return variables, model.apply(variables, x), model.apply(moved, x)[0]

    variables, (logits, aux), moved = fast_jit(run)(jax.random.key(1, impl="rbg"))
    p = variables["params"]
    assert ("pos_embedding" in p) == (patch == 0)  # learned only for pixels
    if patch == 0:
        assert p["pos_embedding"].shape == (1, tokens, 16)
    assert set(p["Transformer"]) == {"encoderblock", "encoder_norm"}
    assert p["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (2, 16, 32)
    assert logits.shape == (B, K) and logits.dtype == jnp.float32
    assert_close(logits, jnp.zeros((B, K)), 0.0, "zero-init head gives zero logits")
    losses = aux["inner_losses"]
    assert losses.shape[0] == 2 and bool(jnp.all(jnp.isfinite(losses)))  # (layers, T + 1)
    # negative control: a non-zero head gives non-zero, input-dependent logits
    assert float(jnp.max(jnp.abs(moved))) > 1e-3
    assert rel_err(moved[0], moved[1]) > 1e-3


@pytest.mark.slow  # a third ViT compilation; shapes and the head are covered above
def test_sgd_mode_uses_inner_rng_and_scan_matches_unrolled():
    sgd = build_model(config(mixer_kwargs={"mode": "sgd", "steps": 2}))
    gd = build_model(config())  # full-batch GD: no RNG, deterministic
    unrolled = build_model(config(scan_layers=False))
    x = images(8)

    def run(key):
        params = with_random_head(sgd.init(key, x)["params"])
        sgd_out = lambda k: sgd.apply({"params": params}, x, train=True, rngs={"inner": k})[0]
        flat = unstack_layers(params, "encoderblock")
        return dict(a=sgd_out(jax.random.key(5)), a2=sgd_out(jax.random.key(5)),
                    b=sgd_out(jax.random.key(6)), gd=gd.apply({"params": params}, x)[0],
                    unrolled=unrolled.apply({"params": flat}, x)[0], flat=flat)

    out = fast_jit(run)(jax.random.key(1, impl="rbg"))
    assert_close(out["a2"], out["a"], 0.0, "same key, same output")
    assert rel_err(out["b"], out["a"]) > 1e-6  # another key, another split into chunks
    assert set(out["flat"]["Transformer"]["encoderblock"]) == {"0", "1"}
    assert_close(out["unrolled"], out["gd"], 1e-5, "unrolled vs scanned ViT")


def test_posemb_sincos_2d():
    pe = np.asarray(posemb_sincos_2d(2, 3, 8))[0]  # (6, 8): tokens (y, x) row-major
    assert pe.shape == (6, 8)
    # token (y=1, x=2): first quarter sin(x·ω), third quarter sin(y·ω), ω = 10000^(-i/(C/4-1))
    omega = 1.0 / 10000.0 ** (np.arange(2) / 1)
    np.testing.assert_allclose(pe[5, :2], np.sin(2 * omega), rtol=1e-6)
    np.testing.assert_allclose(pe[5, 4:6], np.sin(1 * omega), rtol=1e-6)
    with pytest.raises(ValueError, match="width % 4"):
        posemb_sincos_2d(2, 2, 6)
