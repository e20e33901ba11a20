"""The mixer registry: every entry's fields agree with its module (non-causal twin, decode path,
pre-conv), its state size with the real decode state, its FLOP formula with the N-scaling of the
math; and the consumers (build_model, config validation, the report) read those fields."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections as mlc
import pytest

from ttt.config import ConfigError, validate
from ttt.layers import (
    MIXERS,
    LaCTMixer,
    SoftmaxAttention,
    TTTMixer,
    forward_flops,
    make_mixer,
    mixer_spec,
    state_size,
)
from ttt.layers.window_layer import SlidingWindowAttention
from ttt.models import build_model

C, H = 16, 2  # d = 8
N = 24  # one whole mini-batch of 16 and 8 tokens decoded one by one in the TTT prefill
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _floats(tree) -> int:
    """Floats of a pytree of (1, ...) decode-state arrays (batch 1)."""
    return sum(math.prod(leaf.shape[1:]) for leaf in jax.tree.leaves(tree))


def _prefill_cache(module):
    """The decode cache after prefill on N tokens, traced (shapes only, nothing computed)."""
    x = jnp.zeros((1, N, C), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    return jax.eval_shape(lambda p: module.apply(p, x, method="prefill"), params)[2]


# ----------------------------------------------------------------------------- the fields


@pytest.mark.parametrize("name", list(MIXERS))
def test_entry_fields_agree_with_the_module(name):
    spec = MIXERS[name]
    assert spec.name == name and mixer_spec(name) is spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.causal = not spec.causal
    with pytest.raises(TypeError):
        spec.defaults["learner"] = "mlp"  # read-only defaults
    module = make_mixer(name, C, H)
    assert spec.attrs() == {k: getattr(module, k) for k in spec.accepted()}
    assert spec.attrs(dtype=jnp.bfloat16)["dtype"] == jnp.bfloat16
    if "causal" in spec.attrs():
        assert spec.attrs()["causal"] == spec.causal
    if spec.noncausal is not None:
        twin = MIXERS[spec.noncausal]
        assert spec.causal and not twin.causal and twin.noncausal is None
        assert twin.module is spec.module
    if spec.causal:
        for method in ("init_cache", "prefill", "step"):
            assert callable(getattr(module, method, None)), (name, method)
    elif hasattr(module, "init_cache"):
        with pytest.raises(ValueError, match="non-causal"):
            module.apply({}, 1, method="init_cache")
    # the pre-conv goes with the Mamba backbone, whatever the entry's name
    expected = spec.module is TTTMixer and module.backbone == "mamba"
    assert spec.pre_conv(spec.attrs()) == expected
    if spec.module is TTTMixer:
        assert spec.pre_conv(spec.attrs(backbone="mamba"))
        assert not spec.pre_conv(spec.attrs(backbone="transformer"))


def test_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="known mixers: ttt_linear, ttt_mlp"):
        mixer_spec("ttt_lstm")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['minibatch'\]"):
        MIXERS["ttt_linear"].attrs(minibatch=4)
    with pytest.raises(ValueError, match="known mixers"):
        state_size("rnn", C, H, N)


# ----------------------------------------------------------------------------- state sizes

TTT_CASES = [("ttt_linear", {}), ("ttt_mlp", {}), ("ttt_linear_mamba", {}), ("ttt_mlp_mamba", {}),
             ("ttt_linear", {"learn_W0": False}), ("ttt_mlp", {"inner_bias": False}),
             ("ttt_mlp", {"mlp_factor": 2})]


@pytest.mark.parametrize("name,kwargs", TTT_CASES)
def test_ttt_state_size_is_the_decode_cache_W(name, kwargs):
    cache = _prefill_cache(make_mixer(name, C, H, stats=False, **kwargs))
    assert state_size(name, C, H, N, **kwargs) == _floats(cache["W"])


def test_ttt_state_size_follows_the_attributes():
    d = C // H
    assert state_size("ttt_linear", C, H, N) == H * (d * d + d)
    assert state_size("ttt_linear", C, H, N, learn_W0=False) == H * d * d  # no biases then
    assert state_size("ttt_mlp", C, H, N) == H * (2 * d * 4 * d + 4 * d + d)
    assert state_size("ttt_linear", C, H, 4 * N) == state_size("ttt_linear", C, H, N)


@pytest.mark.parametrize("normalize", [None, "adaptive", "constant"])
def test_linear_attention_state_size_is_S_and_s(normalize):
    cache = _prefill_cache(make_mixer("linear_attention", C, H, normalize=normalize))
    want = _floats(cache["S"]) + (_floats(cache["s"]) if normalize else 0)
    assert state_size("linear_attention", C, H, N, normalize=normalize) == want
    assert want == H * (C // H) ** 2 + (C if normalize else 0)


def test_softmax_state_size_is_the_kv_cache_of_the_sequence():
    cache = _prefill_cache(make_mixer("softmax", C, H, cache_size=N))
    assert state_size("softmax", C, H, N) == _floats({"k": cache["k"], "v": cache["v"]})
    assert state_size("softmax", C, H, 2 * N) == 2 * state_size("softmax", C, H, N)


@pytest.mark.parametrize("name", ["mttt_linear", "mttt_mlp"])
def test_mttt_state_size_is_the_inner_weights(name):
    module = make_mixer(name, C, H)
    one_head = jax.eval_shape(lambda k: module.make_learner().init(k, C // H),
                              jax.random.PRNGKey(0))
    assert state_size(name, C, H, N) == H * sum(s.size for s in jax.tree.leaves(one_head))
    if name == "mttt_mlp":  # W0 is learned: the state is exactly the inner_Dense parameters
        params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, N, C)))
        inner = {k: v for k, v in params["params"].items() if k.startswith("inner_Dense")}
        assert state_size(name, C, H, N) == sum(x.size for x in jax.tree.leaves(inner))


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("name", list(MIXERS))
def test_flops_are_positive_and_scale_with_N(name):
    # LaCT's chunks and attention window, the sliding window: 64 tokens
    windowed = {LaCTMixer: dict(chunk=64), SlidingWindowAttention: dict(window=64)}.get(
        MIXERS[name].module)
    f = lambda n, **kw: forward_flops(name, n, 64, 4, **(windowed or {}), **kw)
    n = 256  # a multiple of the mini-batch and of the chunk
    a, b, c = f(n), f(2 * n), f(4 * n)
    assert a > 0
    if MIXERS[name].module is SoftmaxAttention:  # the N×N scores: a pure N² term on top
        assert b - 2 * a > 0 and c - 2 * b == pytest.approx(4 * (b - 2 * a))
    elif windowed:  # affine past the first window (its first queries see fewer keys)
        assert c - b == pytest.approx(2 * (b - a)) and b > 2 * a
    else:  # recurrent (and MTTT): linear in N
        assert b == pytest.approx(2 * a) and c == pytest.approx(4 * a)


def test_flops_follow_the_attributes():
    f = lambda name, **kw: forward_flops(name, 512, 64, 4, **kw)
    assert f("ttt_linear", stats=False, form="primal") > f("ttt_linear", stats=False, form="dual")
    assert f("ttt_linear") > f("ttt_linear", stats=False)  # the diagnostics pass costs
    assert f("ttt_linear", form="auto") == f("ttt_linear", form="dual")  # auto runs the dual form
    assert f("ttt_linear_mamba") > f("ttt_linear")  # the two convolutions
    assert f("linear_attention", form="quadratic") > f("linear_attention", form="cumsum")
    assert f("mttt_mlp", steps=2) > f("mttt_mlp", steps=1) > f("mttt_mlp", steps=0)
    # one mini-batch over the whole sequence (batch GD) is quadratic in N
    gd = lambda n: forward_flops("ttt_linear", n, 64, 4, mini_batch=0, learn_eta=False)
    assert gd(1024) > 2.5 * gd(512)


# ----------------------------------------------------------------------------- consumers


def _lm(mixer, **kw):
    return mlc.ConfigDict(dict(kind="lm", preset="tiny", mixer=mixer, **kw))


def test_build_model_reads_twin_causality_and_pre_conv():
    for name, spec in MIXERS.items():
        if spec.causal:
            assert build_model(_lm(name)).pre_conv == spec.pre_conv(spec.attrs())
        vit = build_model(mlc.ConfigDict(dict(kind="vit", preset="tiny", mixer=name,
                                              num_classes=10, image_size=8, channels=1,
                                              patch_size=2)))
        assert vit.mixer == (spec.noncausal or name)
    assert build_model(_lm("ttt_linear", mixer_kwargs={"backbone": "mamba"})).pre_conv
    assert not build_model(_lm("ttt_linear_mamba", pre_conv=False)).pre_conv  # explicit wins
    with pytest.raises(ValueError, match="'mttt_mlp' is non-causal") as err:
        build_model(_lm("mttt_mlp"))
    assert "\n" not in str(err.value) and "ttt_linear" in str(err.value)


def test_validation_rejects_a_non_causal_lm_mixer():
    from experiments import lm

    config = lm.get_config("ttt_linear,smoke")
    with config.unlocked():
        config.model.mixer = "softmax_noncausal"
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=1, process_count=1)
    assert str(err.value).startswith("config.model.mixer='softmax_noncausal': ")
    assert "non-causal" in str(err.value) and "\n" not in str(err.value)


def test_report_state_size_reads_the_built_mixer():
    from experiments import report, vit

    config = vit.get_config("linear_attention,cpu")
    model = dict(config.model.to_dict(), num_classes=10, image_size=8, channels=1)
    d = 32 // 2  # the tiny ViT: width 32, 2 heads
    # the ViT builds the non-causal twin, which normalises: S and s
    assert report.state_size({"model": model, "data": {}}) == 2 * (d * d + d)
    soft = dict(model, mixer="softmax", mixer_kwargs={})
    assert report.state_size({"model": soft, "data": {}}) == 2 * (8 // 2) ** 2 * 32  # 16 patches


def test_config_module_does_not_import_the_trainer():
    code = ("import sys, ttt.config; bad = sorted(m for m in sys.modules "
            "if m.startswith('ttt.train')); print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- decode checks
# The input and cache checks every decoding mixer shares (`ttt.ops.checks.check_step`), held
# for each recurrent family member in one place; shapes only (eval_shape: the checks trace).
STEP_CASES = [("deltanet", {"chunk": 4}, True), ("gated_deltanet", {"chunk": 4}, True),
              ("swa", {"window": 4}, False), ("mamba2", {"d_state": 8, "head_dim": 8}, False),
              ("titans", {"mini_batch": 2}, True), ("ttt_linear", {}, True),
              ("linear_attention", {}, False)]


@pytest.mark.parametrize("name,kwargs,batch_checked", STEP_CASES)
def test_bad_inputs_and_caches_raise_one_line(name, kwargs, batch_checked):
    layer = make_mixer(name, C, H, **kwargs)
    x = jnp.zeros((1, 4, C))
    v = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    run = lambda *args, **kw: jax.eval_shape(lambda v, a: layer.apply(v, *a, **kw), v, args)
    with pytest.raises(ValueError, match=rf"\(B, N, C={C}\)"):
        run(jnp.zeros((1, 4, C + 2)))
    cache = jax.eval_shape(lambda v: layer.apply(v, 1, method="init_cache"), v)
    with pytest.raises(ValueError, match=r"x_t must be \(B, 1, C\)"):
        run(x[:, :2], cache, method="step")
    some = dict(list(cache.items())[1:])
    with pytest.raises(ValueError, match="cache: expected a dict with keys"):
        run(x[:, :1], some, method="step")
    if batch_checked:
        with pytest.raises(ValueError, match="cache: built for batch 1, x_t has batch 2"):
            run(jnp.zeros((2, 1, C)), cache, method="step")
