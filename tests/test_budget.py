"""Budgets that scale down: a run cut to any train.steps >= 1 validates and trains (ttt.budget)."""

from __future__ import annotations

import pathlib

import pytest

from experiments.specs import load_config
from ttt import budget
from ttt import main as ttt_main
from ttt.config import validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
# every shipped config file with its tokens the way the docs run them (full-length runs)
SPECS = ("experiments/lm.py", "experiments/lm.py:ttt_mlp,cpu", "experiments/lm.py:lact,long",
         "experiments/lm.py:ttt_linear,125m,paper", "experiments/mqar.py",
         "experiments/mqar.py:softmax,harness", "experiments/vit.py", "experiments/vit.py:cpu",
         "experiments/ablation.py")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("steps", [1, 7])
def test_every_config_cut_to_a_few_steps_validates(spec, steps, monkeypatch):
    monkeypatch.chdir(ROOT)
    full = load_config(spec)
    config = load_config(spec, [f"train.steps={steps}"])
    devices = 8 if config.train.parallel == "mesh" else 1  # the paper recipe's fsdp=8 mesh
    validate(config, num_devices=devices, process_count=1)  # e.g. warm-up <= steps
    assert config.optim.warmup_steps <= steps
    if full.optim.warmup_steps:  # the warm-up keeps its share of the run
        assert config.optim.warmup_steps == min(full.optim.warmup_steps,
                                                full.optim.warmup_steps * steps
                                                // full.train.steps)
    for key in budget.INTERVALS:
        value = config.train.get(key)
        assert value is None or value <= max(steps, full.train.get(key) or 0)
        assert value is None or value == 0 or value <= steps or value == full.train.get(key)


def test_what_the_user_sets_is_kept_and_a_full_run_is_untouched(monkeypatch):
    monkeypatch.chdir(ROOT)
    full = load_config("experiments/lm.py")
    same = load_config("experiments/lm.py", [f"train.steps={full.train.steps}"])
    assert same.to_dict() == full.to_dict()
    longer = load_config("experiments/lm.py", [f"train.steps={2 * full.train.steps}"])
    assert longer.optim.warmup_steps == full.optim.warmup_steps  # only a cut run scales
    kept = load_config("experiments/lm.py", ["train.steps=10", "optim.warmup_steps=3",
                                             "train.log_every=5"])
    assert kept.optim.warmup_steps == 3 and kept.train.log_every == 5
    assert kept.train.eval_every == 10  # not set: capped


def test_the_changes_are_returned_as_lines(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config("experiments/lm.py")
    with config.unlocked():
        config.train.steps = 20
    lines = budget.follow_steps(config, 2000)
    assert "optim.warmup_steps: 200 -> 2" in lines


def test_a_bare_config_cut_to_one_step_trains(tmp_path, monkeypatch, capsys):
    """The real CLI: the bare LM config (warm-up and intervals sized for 2,000 steps) cut to one
    step of a small batch trains, and the console says what followed."""
    monkeypatch.chdir(ROOT)
    rc = ttt_main.main(["--config=experiments/lm.py", f"--workdir={tmp_path / 'run'}",
                        "--config.train.steps=1", "--config.train.global_batch_size=2",
                        "--config.data.seq_len=32"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "optim.warmup_steps: 200 -> 0" in err
    assert "estimated:" not in err  # a one-step run has nothing left to estimate
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_the_estimate_line_reads_well():
    from ttt.train.train import _estimate_line

    assert _estimate_line(1.2, 1997, 2000).startswith(
        "estimated: 1.2 s per step, ~40 min for the 1,997 steps left of 2,000")
    assert "~2.0 h" in _estimate_line(4.0, 1800, 2000)
    assert "~5 s" in _estimate_line(0.5, 10, 13)
