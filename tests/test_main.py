"""The command line: config validation in one line naming the key, and the real tiny LM / ViT
trained end-to-end through `python -m ttt.main` into a temporary workdir, then resumed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from ttt.config import ConfigError, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments",
                                                                     f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("arg", ["ttt_linear,smoke", "ttt_mlp,smoke", "softmax,smoke"])
def test_lm_configs_validate(arg):
    config = _experiment("lm").get_config(arg)
    validate(config, num_devices=8, process_count=1)
    assert config.optim.ttt_mlp_lr_warmup == arg.startswith("ttt_mlp")


def test_vit_config_validates():
    validate(_experiment("vit").get_config("mttt_mlp,smoke"), num_devices=8, process_count=1)


@pytest.mark.parametrize("change, key", [
    (lambda c: c.model.update(mixer="ttt_quadratic"), "config.model.mixer="),
    (lambda c: c.model.update(width=64, num_heads=3), "config.model.num_heads=3"),
    (lambda c: c.model.update(mixer_kwargs={"mini_batch": -4}),
     "config.model.mixer_kwargs.mini_batch=-4"),
    (lambda c: c.train.update(parallel="pmap", global_batch_size=12),
     "config.train.global_batch_size=12"),
    (lambda c: c.train.update(parallel="mesh", mesh={"data": 3, "fsdp": 1, "model": 1}),
     "config.train.mesh"),
    (lambda c: c.train.update(grad_accum=3), "config.train.grad_accum=3"),
    (lambda c: c.train.update(parallel="tpu"), "config.train.parallel='tpu'"),
    (lambda c: c.optim.update(warmup_steps=99), "config.optim.warmup_steps=99"),
])
def test_validation_names_the_key(change, key):
    config = _experiment("lm").get_config("ttt_linear,smoke")
    with config.unlocked():
        change(config)
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=8, process_count=1)
    message = str(err.value)
    assert message.startswith(key) and "\n" not in message, message


def test_missing_data_is_a_config_error(tmp_path):
    from ttt.train import train_and_evaluate

    config = _experiment("lm").get_config("ttt_linear,smoke")
    config.data.update(name="tfds_text", dataset="lm1b", data_dir=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"^config\.data"):
        train_and_evaluate(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work" / "checkpoints")  # failed before anything ran


def _env(cache):
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                XLA_FLAGS="--xla_force_host_platform_device_count=8",
                JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _main(config, workdir, cache, *flags, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "ttt.main", f"--config={config}", f"--workdir={workdir}", *flags],
        env=_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def test_cli_bad_config_is_one_line(tmp_path):
    # an unknown mixer, set by an override: the config validation names the key
    rc, err = _main(os.path.join(ROOT, "experiments/lm.py:smoke"), tmp_path / "w",
                    tmp_path / "cache", "--config.model.mixer=nosuchmixer")
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "config.model.mixer='nosuchmixer'" in lines[0], err[-2000:]
    # a typo in the config argument is never taken for a mixer name: the flag parser stops, in
    # one line (bad override values take the same path: test_experiments, compare.load_config)
    rc, err = _main(os.path.join(ROOT, "experiments/lm.py:nosuchmixer,smoke"), tmp_path / "w",
                    tmp_path / "cache")
    assert rc == 2, err[-2000:]
    assert err.strip().startswith("error: ") and "\n" not in err.strip(), err[-2000:]
    assert "unknown token 'nosuchmixer'; known causal mixers: ttt_linear" in err, err[-2000:]


# The smallest real models: one block, width 16, 2 heads, 16 tokens (LM) / 8x8 digits (ViT).
# Fields that default to None cannot be overridden by flags, so a wrapper config shrinks them.
SHRINK = """
import importlib.util
def get_config(arg):
    spec = importlib.util.spec_from_file_location("base", {path!r})
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg)
    c.model.update(num_layers=1, width=16, num_heads=2, {extra})
    c.train.stop_at = 0
    return c
"""
E2E = {
    "lm": ("lm", "ttt_linear,smoke", "tokens/s", "ffn_dim=32); c.data.update(seq_len=16"),
    "vit": ("vit", "mttt_mlp,smoke", "images/s", "mlp_dim=32, patch_size=2"),
}


@pytest.mark.parametrize("kind", ["lm", pytest.param("vit", marks=pytest.mark.slow)])
def test_end_to_end_then_resume(tmp_path, kind):
    name, arg, unit, extra = E2E[kind]
    (tmp_path / "tiny.py").write_text(SHRINK.format(
        path=os.path.join(ROOT, "experiments", f"{name}.py"), extra=extra))
    config = f"{tmp_path / 'tiny.py'}:{arg}"
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    common = ["--config.train.steps=3", "--config.train.checkpoint_every=2",
              "--config.train.eval_every=2", "--config.train.eval_steps=1",
              "--config.train.global_batch_size=8"]
    # Same schedule (3 steps) both times, so the resumed run reuses the compilation cache.
    rc, err = _main(config, workdir, cache, *common, "--config.train.stop_at=2")
    assert rc == 0, err[-3000:]
    assert unit in err  # the progress bar
    rc, err = _main(config, workdir, cache, *common)
    assert rc == 0, err[-3000:]
    assert "resumed from checkpoint step 2" in err, err[-3000:]

    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]  # resumed, not restarted
    assert [r["step"] for r in evals] == [2, 3] and "eval/accuracy" in evals[0]
    assert any(k.startswith("train/aux/") for k in train[0])  # inner-loop diagnostics
    assert all(r["train/loss"] == r["train/loss"] for r in train)  # finite (not NaN)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tb"))
    saved = json.load(open(workdir / "config.json"))
    assert saved["train"]["steps"] == 3 and saved["model"]["num_layers"] == 1
