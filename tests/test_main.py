"""The command line: config validation in one line naming the key, and the real tiny LM / ViT
trained end-to-end through `python -m ttt.main` into a temporary workdir, then resumed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
    # one line (bad override values take the same path: test_experiments, specs.load_config)
    rc, err = _main(os.path.join(ROOT, "experiments/lm.py:nosuchmixer,smoke"), tmp_path / "w",
                    tmp_path / "cache")
    assert rc == 2, err[-2000:]
    assert err.strip().startswith("error: ") and "\n" not in err.strip(), err[-2000:]
    assert "unknown token 'nosuchmixer'; known causal mixers: ttt_linear" in err, err[-2000:]


# The smallest real models: one block, width 16, 2 heads, 16 tokens (LM) / 8x8 digits (ViT), set
# from the command line (size fields are typed placeholders, so they override like any other).
TINY = {
    "lm": ["--config.model.num_layers=1", "--config.model.width=16", "--config.model.num_heads=2",
           "--config.model.ffn_dim=32", "--config.data.seq_len=16"],
    "vit": ["--config.model.num_layers=1", "--config.model.width=16", "--config.model.num_heads=2",
            "--config.model.mlp_dim=32", "--config.model.patch_size=2"],
}
E2E = {"lm": ("lm", "ttt_linear,smoke", "tokens/s"), "vit": ("vit", "mttt_mlp,smoke", "images/s")}


@pytest.mark.parametrize("kind", ["lm", pytest.param("vit", marks=pytest.mark.slow)])
def test_end_to_end_then_resume(tmp_path, kind):
    name, arg, unit = E2E[kind]
    config = os.path.join(ROOT, "experiments", f"{name}.py:{arg}")
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    common = [*TINY[kind], "--config.train.steps=3", "--config.train.checkpoint_every=2",
              "--config.train.eval_every=2", "--config.train.eval_steps=1",
              "--config.train.global_batch_size=8"]
    # Same schedule (3 steps) both times, so the resumed run reuses the compilation cache.
    rc, err = _main(config, workdir, cache, *common, "--config.train.stop_at=2")
    assert rc == 0, err[-3000:]
    assert unit in err  # the progress bar
    # the console: what runs where, the changes from the file, compilation timed on its own,
    # evaluations, checkpoints and a closing summary
    assert f"workdir: {workdir} (new run)" in err, err[-3000:]
    assert re.search(r"model: .*, [\d,]+ parameters", err) and "devices: 8 x cpu" in err
    preset_width = 64 if kind == "lm" else 32  # the tiny presets'
    assert "changed from" in err and f"model.width: {preset_width} -> 16" in err, err[-3000:]
    assert re.search(r"compiled the train step in [\d.]+ s", err), err[-3000:]
    assert re.search(r"eval @ step 2: loss [\d.]+", err) and "checkpoint: step 2" in err
    assert re.search(r"paused at step 2 of 3 .*compilation", err), err[-3000:]
    rc, err = _main(config, workdir, cache, *common)
    assert rc == 0, err[-3000:]
    assert "resumed from checkpoint step 2" in err, err[-3000:]
    assert re.search(r"done: step 3 of 3; [\d.]+ s training \+ [\d.]+ s compilation", err)
    assert "Traceback" not in err

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
    # the resolved values: sizes given and sizes taken from the preset / the dataset
    if kind == "lm":
        assert saved["model"]["width"] == 16 and saved["model"]["vocab_size"] == 257
    else:
        assert saved["model"]["image_size"] == 8 and saved["model"]["num_classes"] == 10


# --------------------------------------------------------------------------- one error style
# Every bad flag, override key, config file, config token, workdir, dataset or shape: exit status
# 2 and exactly one line on stderr, `error: ...`, that names what to change; no traceback.
LM = os.path.join(ROOT, "experiments", "lm.py")
VIT = os.path.join(ROOT, "experiments", "vit.py")
MQAR = os.path.join(ROOT, "experiments", "mqar.py")
SMOKE = f"--config={LM}:ttt_linear,smoke"
BAD_INPUTS = [
    # (id, entry point, argv; "{tmp}" is a fresh directory, "{file}" a plain file in it, expected
    # fragment of the message)
    ("unknown flag", "main", ["--wrokdir={tmp}/w", SMOKE], "unknown flag --wrokdir"),
    ("missing --config", "main", ["--workdir={tmp}/w"], "--config is required"),
    ("missing --workdir", "main", [SMOKE], "--workdir is required"),
    ("flag type", "main", [SMOKE, "--workdir={tmp}/w", "--num_processes=two"],
     "--num_processes=two: expected an integer"),
    ("stray argument", "main", [SMOKE, "--workdir={tmp}/w", "steps=3"], "unexpected argument"),
    ("config file missing", "main", [f"--config={ROOT}/experiments/nope.py:smoke",
                                     "--workdir={tmp}/w"], "no such file"),
    ("config not python", "main", [f"--config={ROOT}/README.md", "--workdir={tmp}/w"],
     "expected a Python file"),
    ("config does not load", "main", ["--config={tmp}/broken.py:x", "--workdir={tmp}/w"],
     "does not load (SyntaxError"),
    # a misspelt token: today's parser takes it for a mixer name, a stricter one names the token;
    # either way the message names it
    ("config token typo", "main", [f"--config={LM}:ttt_linear,smok", "--workdir={tmp}/w"],
     "'smok'"),
    ("config token case", "main", [f"--config={LM}:ttt_linear,125M", "--workdir={tmp}/w"],
     "'125M'"),
    ("config token value", "main", [f"--config={MQAR}:ttt_linear,n=abc", "--workdir={tmp}/w"],
     "abc"),
    ("override key typo", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.stpes=3"],
     "config.train has no key 'stpes' (did you mean 'steps'?)"),
    ("override section typo", "main", [SMOKE, "--workdir={tmp}/w", "--config.trian.steps=3"],
     "config has no key 'trian' (did you mean 'train'?)"),
    ("override value type", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.steps=many"],
     "--config.train.steps=many: expected an integer"),
    ("override a section", "main", [SMOKE, "--workdir={tmp}/w", "--config.model.mixer_kwargs=3"],
     "is a section"),
    ("mixer argument typo", "main", [SMOKE, "--workdir={tmp}/w",
                                     "--config.model.mixer_kwargs.mini_batchh=8"],
     "mini_batchh"),
    ("mixer argument value", "main", [SMOKE, "--workdir={tmp}/w",
                                      "--config.model.mixer_kwargs.mini_batch=-4"],
     "config.model.mixer_kwargs.mini_batch=-4"),
    ("zero batch", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.global_batch_size=0"],
     "config.train.global_batch_size=0"),
    ("zero steps", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.steps=0"],
     "config.train.steps=0"),
    ("batch vs devices", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.parallel=pmap",
                                  "--config.train.global_batch_size=12"],
     "config.train.global_batch_size=12"),
    ("mesh vs devices", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.parallel=mesh",
                                 "--config.train.mesh.fsdp=3"], "config.train.mesh"),
    ("unknown parallel", "main", [SMOKE, "--workdir={tmp}/w", "--config.train.parallel=tpu"],
     "config.train.parallel='tpu'"),
    ("heads vs width", "main", [SMOKE, "--workdir={tmp}/w", "--config.model.num_heads=3"],
     "config.model.num_heads=3"),
    ("negative lr", "main", [SMOKE, "--workdir={tmp}/w", "--config.optim.lr=-1"],
     "config.optim.lr=-1"),
    ("unknown preset", "main", [SMOKE, "--workdir={tmp}/w", "--config.model.preset=huge"],
     "'huge'"),
    ("unknown dtype", "main", [SMOKE, "--workdir={tmp}/w", "--config.model.dtype=float16"],
     "'float16'"),
    ("unknown dataset", "main", [SMOKE, "--workdir={tmp}/w", "--config.data.name=nosuch"],
     "unknown data.name 'nosuch'"),
    ("missing tokenizer", "main", [SMOKE, "--workdir={tmp}/w",
                                   "--config.data.tokenizer={tmp}/no.model"], "tokenizer file"),
    ("missing text files", "main", [SMOKE, "--workdir={tmp}/w", "--config.data.name=text_files",
                                    "--config.data.paths={tmp}/none"], "does not exist"),
    ("mixup in the pipeline", "main", [f"--config={VIT}:mttt_mlp,imagenet", "--workdir={tmp}/w",
                                       "--config.data.mixup=0.2"],
     "set config.train.mixup_alpha=0.2"),
    ("workdir is a file", "main", [SMOKE, "--workdir={file}"], "not a directory"),
    ("workdir cannot be created", "main", [SMOKE, "--workdir={file}/sub"], "cannot be created"),
    ("init run missing", "main", [SMOKE, "--workdir={tmp}/w",
                                  "--config.init.from_workdir={tmp}/none"],
     "config.init.from_workdir='{tmp}/none': no such run directory"),
    ("two init sources", "main", [SMOKE, "--workdir={tmp}/w", "--config.init.from_workdir={tmp}",
                                  "--config.init.transformer_workdir={tmp}"], "set one of"),
    ("sample: no run", "sample", ["--workdir={tmp}/none", "--prompt=hi"], "no such run"),
    ("sample: missing prompt", "sample", ["--workdir={tmp}"], "--prompt is required"),
    ("sample: bad temperature", "sample", ["--workdir={tmp}", "--prompt=x", "--temperature=-1"],
     "--temperature=-1.0: must be >= 0"),
    ("evaluate: not a run", "evaluate", ["--workdir={tmp}"], "holds no config.json"),
    ("evaluate: bad split", "evaluate", ["--workdir={tmp}", "--split=dev"], "--split=dev"),
]


def _entry(name):
    import ttt.evaluate
    import ttt.main
    import ttt.sample

    return {"main": ttt.main.main, "sample": ttt.sample.main, "evaluate": ttt.evaluate.main}[name]


def _fill(items, tmp):
    return [a.replace("{tmp}", str(tmp)).replace("{file}", str(tmp / "plain.txt")) for a in items]


def test_bad_inputs_are_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "plain.txt").write_text("not a directory\n")
    (tmp_path / "broken.py").write_text("def get_config(arg)\n    return None\n")
    seen = []
    for name, entry, argv, expected in BAD_INPUTS:
        rc = _entry(entry)(_fill(argv, tmp_path))
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        seen.append((name, rc, err.strip()))
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, rc, err)
        assert _fill([expected], tmp_path)[0] in lines[0], (name, lines[0])
        assert "Traceback" not in err and not out.strip(), (name, out)
    assert len(seen) >= 15
    assert not os.path.exists(tmp_path / "w" / "config.json")  # no run began anywhere
    # --debug keeps the traceback of the same mistake
    assert _entry("main")([SMOKE, f"--workdir={tmp_path}/w", "--config.train.stpes=3",
                           "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bad_inputs_through_real_processes(tmp_path):
    """A few of the table through `python -m ...` itself: the process's stderr is that one line."""
    (tmp_path / "plain.txt").write_text("x\n")
    picked = ["unknown flag", "override key typo", "zero batch", "workdir is a file",
              "evaluate: bad split"]
    for name, entry, argv, expected in BAD_INPUTS:
        if name not in picked:
            continue
        module = "ttt.main" if entry == "main" else f"ttt.{entry}"
        proc = subprocess.run([sys.executable, "-m", module, *_fill(argv, tmp_path)],
                              env=_env(tmp_path / "cache"), cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, proc.returncode, proc.stderr)
        assert lines[0].startswith("error: ") and _fill([expected], tmp_path)[0] in lines[0]


def test_overrides_are_typed_and_listed():
    from ttt import cli
    from ttt.config import with_defaults

    base = with_defaults(_experiment("lm").get_config("ttt_linear,smoke"))
    config = cli.apply_overrides(with_defaults(base), [
        ("model.width", "96"), ("model.mixer_kwargs.mini_batch", "8"),
        ("train.mesh", "{'data': 2, 'fsdp': 4, 'model': 1}"), ("optim.lr", "1e-3"),
        ("train.progress", "false"), ("train.stop_at", "2"), ("init.from_workdir", "/tmp/a"),
        ("data.tokenizer", "byte")])
    assert config.model.width == 96 and config.model.mixer_kwargs.mini_batch == 8
    assert config.train.mesh.to_dict() == {"data": 2, "fsdp": 4, "model": 1}
    assert config.optim.lr == 1e-3 and config.train.progress is False
    assert config.train.stop_at == 2 and config.init.from_workdir == "/tmp/a"
    changes = cli.changed_values(base, config)
    assert "model.width: None -> 96" in changes and "optim.lr: 0.003 -> 0.001" in changes
    assert "model.mixer_kwargs.mini_batch: (unset) -> 8" in changes
    assert not any(c.startswith("data.tokenizer") for c in changes)  # unchanged
    assert base.model.width is None  # the defaults were copied, not changed
    with pytest.raises(cli.UsageError, match="expected true or false"):
        cli.apply_overrides(config, [("train.progress", "maybe")])
