"""docs/extending.md's two examples, in Python and through the command line: a learner of your
own (experiments/examples/residual_mlp.py) and a mixer of your own (experiments/examples/
ema_mixer.py); the registries' checks; the doc's code is the examples' code."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt import extensions, layers
from ttt.errors import ConfigError
from ttt.ops import Learner, build_learner, learner_names, register_learner, ttt_dual, ttt_primal
from ttt.ops.learners import ln_residual

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEARNER_FILE = "experiments/examples/residual_mlp.py"
MIXER_FILE = "experiments/examples/ema_mixer.py"


@pytest.fixture(scope="module")
def examples():
    """Import both examples the way `--import` does (paths relative to the repository)."""
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        learner_mod, mixer_mod = (extensions.import_one(p) for p in (LEARNER_FILE, MIXER_FILE))
    finally:
        os.chdir(cwd)
    return learner_mod, mixer_mod


# ------------------------------------------------------------------------------ the learner


def test_the_learner_is_registered_and_built_with_the_layer_options(examples):
    assert "residual_mlp" in learner_names()
    built = build_learner("residual_mlp", bias=False, mlp_factor=2)
    W = built.init(jax.random.PRNGKey(0), 4)
    assert set(W) == {"W1", "W2"} and W["W1"].shape == (4, 8)  # bias off, hidden 2·d
    assert built.dense is None and built.loss is not None  # -> the primal form


def test_its_loss_is_the_loss_the_inner_loop_descends(examples, x64):
    """One token, mini-batch 1: W1 = W0 − η ∇huber(f(k; W0), v), the gradient taken here of the
    Huber formula written out; the op's answer f(q; W1) matches it, and a squared-error learner
    of the same weights answers differently (the negative control)."""
    learner_mod, _ = examples
    if True:  # float64 (the x64 fixture)
        learner = learner_mod.residual_mlp()
        d = 4
        W0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64) * 30.0,  # residuals > δ
                                    learner.init(jax.random.PRNGKey(1), d))
        keys = jax.random.split(jax.random.PRNGKey(2), 3)
        q, k, v = (jax.random.normal(kk, (1, 1, 1, d), jnp.float64) for kk in keys)
        eta = jnp.full((1, 1, 1, 1), 0.3, jnp.float64)
        W0h = jax.tree_util.tree_map(lambda a: a[None], W0)

        def huber_by_hand(W):
            r = learner.apply(W, k[0, 0, 0]) - v[0, 0, 0]
            a = jnp.abs(r)
            return jnp.sum(jnp.where(a <= 1.0, 0.5 * r * r, a - 0.5))

        g = jax.grad(huber_by_hand)(W0)
        W1 = jax.tree_util.tree_map(lambda w, gw: w - 0.3 * gw, W0, g)
        want = learner.apply(W1, q[0, 0, 0])
        z, W_last = ttt_primal(learner, W0h, q, k, v, eta, mini_batch=1)
        np.testing.assert_allclose(np.asarray(z[0, 0, 0]), np.asarray(want), rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(np.asarray(W_last["W1"][0, 0]), np.asarray(W1["W1"]),
                                   rtol=1e-12, atol=1e-12)
        squared = learner._replace(loss=None)
        z_sq, _ = ttt_primal(squared, W0h, q, k, v, eta, mini_batch=1)
        assert np.max(np.abs(np.asarray(z_sq - z))) > 1e-3


def test_the_dual_form_refuses_it_and_ln_residual_keeps_its_loss(examples):
    learner = build_learner("residual_mlp")
    W0 = jax.tree_util.tree_map(lambda a: a[None], learner.init(jax.random.PRNGKey(0), 4))
    x = jnp.ones((1, 1, 4, 4))
    with pytest.raises(ValueError, match="dense-chain"):
        ttt_dual(learner, W0, x, x, x, jnp.ones((1, 1, 4, 4)) * 0.1, mini_batch=4)
    wrapped = ln_residual(learner)
    assert wrapped.loss is learner.loss and wrapped.dense is None


def test_a_ttt_layer_with_the_registered_learner(examples):
    """forward == the primal form; decode == forward; the registry's state size is the inner
    weights' size; the Huber loss changes the layer's answer (a squared-error twin differs)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 7, 8))
    mixer = layers.make_mixer("ttt_mlp", 8, 2, learner="residual_mlp", mini_batch=2,
                              mlp_factor=2, stats=False)
    params = mixer.init(jax.random.PRNGKey(1), x)
    forward = jax.jit(lambda m, p, x: m.apply(p, x)[0], static_argnums=0)
    y = forward(mixer, params, x)
    np.testing.assert_array_equal(np.asarray(y),
                                  np.asarray(forward(mixer.clone(form="primal"), params, x)))
    y1, _, cache = mixer.apply(params, x[:, :4], method=mixer.prefill)
    step = jax.jit(lambda p, x_t, c: mixer.apply(p, x_t, c, method=mixer.step))
    steps = [y1]
    for t in range(4, 7):
        yt, cache = step(params, x[:, t:t + 1], cache)
        steps.append(yt)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(y), atol=2e-6)
    W0 = params["params"]["W0"]
    assert layers.state_size("ttt_mlp", 8, 2, 7, learner="residual_mlp", mlp_factor=2) == sum(
        a.size for a in jax.tree_util.tree_leaves(W0))
    squared = build_learner("residual_mlp", mlp_factor=2)._replace(loss=None)
    y_sq = forward(mixer.clone(learner=squared), params, x)
    assert np.max(np.abs(np.asarray(y_sq - y))) > 1e-6


def test_an_mttt_layer_takes_a_learner_object(examples):
    learner = build_learner("residual_mlp")
    mixer = layers.make_mixer("mttt_linear", 16, 2, learner=learner)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 16))
    params = mixer.init(jax.random.PRNGKey(1), x)
    y, aux = mixer.apply(params, x)
    assert y.shape == x.shape and np.all(np.isfinite(np.asarray(y)))
    assert "W0" in params["params"]  # the whole inner tree as one learned parameter


def test_learner_registry_errors():
    make = lambda **kw: build_learner("linear")
    for name in ("linear", "mlp"):
        with pytest.raises(ValueError, match="already a learner"):
            register_learner(name, make, replace=True)
    with pytest.raises(ValueError, match="identifier"):
        register_learner("not a name", make)
    register_learner("_test_twice", make, replace=True)
    with pytest.raises(ValueError, match="replace=True"):
        register_learner("_test_twice", make)
    with pytest.raises(ValueError, match="expected one of"):
        build_learner("no_such_learner")
    with pytest.raises(ValueError, match="expected one of"):
        layers.make_mixer("ttt_linear", 16, 2, learner="no_such_learner")


# ------------------------------------------------------------------------------ the mixer


def test_the_registered_mixer_decodes_as_it_runs(examples):
    spec = layers.mixer_spec("ema")
    assert spec.causal and spec.description
    mixer = layers.make_mixer("ema", 16, 2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 16))
    params = mixer.init(jax.random.PRNGKey(1), x)
    y, _ = mixer.apply(params, x)
    y1, _, cache = mixer.apply(params, x[:, :4], method=mixer.prefill)
    steps = [y1]
    for t in range(4, 9):
        yt, cache = mixer.apply(params, x[:, t:t + 1], cache, method=mixer.step)
        steps.append(yt)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(y), atol=1e-6)
    assert layers.state_size("ema", 16, 2, 9) == 16
    assert layers.forward_flops("ema", 9, 16, 2) > 0


def test_a_language_model_of_the_registered_mixer_generates_what_it_computes(examples):
    from ttt.models.lm import CausalLM

    model = CausalLM(vocab_size=32, width=16, num_heads=2, num_layers=2, ffn_dim=32,
                     mixer="ema", scan_layers=True)
    ids = jax.random.randint(jax.random.PRNGKey(0), (1, 7), 0, 32)
    params = model.init(jax.random.PRNGKey(1), ids)
    logits, _ = model.apply(params, ids)
    last, cache = model.apply(params, ids[:, :5], method=model.prefill)
    outs = [last]
    for t in range(5, 7):
        lt, cache = model.apply(params, ids[:, t:t + 1], cache, method=model.step)
        outs.append(lt)
    np.testing.assert_allclose(np.asarray(outs[-1]).reshape(-1),
                               np.asarray(logits[:, -1]).reshape(-1), atol=1e-4)


class _NoDecode(nn.Module):
    width: int
    num_heads: int

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        return x, {}


def test_register_mixer_checks_the_module_first(examples):
    _, mixer_mod = examples
    ok = layers.mixer_spec("ema")
    with pytest.raises(ValueError, match="already a mixer"):
        layers.register_mixer(dataclasses.replace(ok, name="softmax"), replace=True)
    with pytest.raises(ValueError, match="replace=True"):
        layers.register_mixer(ok)
    with pytest.raises(ValueError, match="lacks init_cache, prefill, step"):
        layers.register_mixer(layers.MixerSpec("_no_decode", _NoDecode))
    with pytest.raises(ValueError, match="not a registered non-causal"):
        layers.register_mixer(layers.MixerSpec("_bad_twin", _NoDecode, causal=False,
                                               noncausal="softmax"))
    with pytest.raises(ValueError, match="unknown argument"):
        layers.register_mixer(layers.MixerSpec("_bad_default", mixer_mod.EMAMixer,
                                               defaults={"no_such": 1}))
    with pytest.raises(ValueError, match="flax.linen.Module"):
        layers.register_mixer(layers.MixerSpec("_not_module", object))
    layers.register_mixer(layers.MixerSpec("_plain", _NoDecode, causal=False), replace=True)
    assert layers.state_size("_plain", 8, 2, 4) is None  # not stated: reports say n/a
    assert layers.forward_flops("_plain", 4, 8, 2) is None


def test_import_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        extensions.load(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="does not load.*boom"):
        extensions.load(str(bad))
    with pytest.raises(ConfigError, match="no_such_module"):
        extensions.load("no_such_module")
    assert extensions.parse(" a.py, ,b ") == ["a.py", "b"]


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("case", ["mixer", "learner"])
def test_the_examples_train_and_sample_through_the_command_line(case, tmp_path, monkeypatch,
                                                                capsys):
    """`python -m ttt.main --import=FILE ...` trains; `python -m ttt.sample` finds the names
    again from the run's config.json alone."""
    from ttt import main as ttt_main
    from ttt import sample as ttt_sample

    monkeypatch.chdir(ROOT)
    workdir = str(tmp_path / case)
    if case == "mixer":
        args = [f"--import={MIXER_FILE}", "--config=experiments/lm.py:ema,smoke"]
    else:
        args = [f"--import={LEARNER_FILE}", "--config=experiments/lm.py:ttt_linear,smoke",
                "--config.model.mixer_kwargs.learner=residual_mlp",
                "--config.model.mixer_kwargs.mini_batch=4"]
    steps = 4 if case == "mixer" else 2
    args += [f"--workdir={workdir}", f"--config.train.steps={steps}",
             "--config.model.num_layers=1"]
    assert ttt_main.main(args) == 0
    if case == "mixer":  # timed after the first steps: what the rest of the run will take
        assert "estimated: " in capsys.readouterr().err
    config = (pathlib.Path(workdir) / "config.json").read_text()
    assert re.search(r'"imports": \[\s*"experiments/examples/', config)
    capsys.readouterr()
    assert ttt_sample.main([f"--workdir={workdir}", "--prompt=ab", "--max_tokens=3"]) == 0
    assert capsys.readouterr().out  # the sampled text


def test_the_docs_show_the_examples_code():
    """Every python block of docs/extending.md is a verbatim piece of an example file."""
    doc = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    files = "\n".join((ROOT / p).read_text() for p in (LEARNER_FILE, MIXER_FILE))
    assert len(blocks) >= 3
    for block in blocks:
        assert block in files, block[:80]


def test_a_learner_object_is_a_learner():
    assert isinstance(build_learner("mlp"), Learner)


def test_a_comparison_spec_imports_the_extension(monkeypatch):
    """`experiments.compare --set imports=FILE` loads a config naming the registered mixer (in
    each worker, through experiments.specs) and records the import for the run's config.json."""
    from experiments.specs import load_config

    monkeypatch.chdir(ROOT)
    config = load_config("experiments/lm.py:ema,smoke", [f"imports={MIXER_FILE}",
                                                          "train.steps=2"])
    assert config.model.mixer == "ema" and list(config.imports) == [MIXER_FILE]
