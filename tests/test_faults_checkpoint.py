"""Good checkpoints: each records its step's training loss and parameter norm; a diverged run names
the checkpoints with their losses and the command that restarts from the last sound one, and that
command (with a sane rate) trains on in the same workdir; `--resume_step` moves the later
checkpoints aside; a workdir already at (or past) `train.steps` changes nothing; the console
announces a checkpoint only once it has committed.

The end-to-end test runs the real tiny LM through `python -m ttt.main`; the rest use the stand-in
model (tests/toy.py) in process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys

import optax
import pytest
import toy

from ttt.main import restart_command
from ttt.train import Checkpointer, divergence
from ttt.train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stats(loss, norm, init=10.0):
    return {"loss": loss, "param_norm": norm, "init_param_norm": init}


# --------------------------------------------------------------------------- the restart rule


def test_restart_rule():
    ok = [(2, _stats(5.0, 11.0)), (4, _stats(4.0, 12.0)), (6, _stats(3.5, 13.0))]
    # all sound, NaN at step 9: checkpoint 6 (before step 8, whose parameters made step 9's loss)
    assert divergence.restart_step(ok, 9) == 6
    # NaN right after checkpoint 6: its parameters gave the NaN, so 4
    assert divergence.restart_step(ok, 7) == 4
    # the norm of checkpoint 6 exploded: its own parameters are bad, 4 is fine
    blown = ok[:2] + [(6, _stats(3.5, 1e5))]
    assert divergence.restart_step(blown, 7) == 4
    assert divergence.restart_step(blown, 20) == 4
    # the loss of checkpoint 6 jumped (> 1.5x the best): the parameters after step 5 made it,
    # checkpoint 4 came before them
    jumped = ok[:2] + [(6, _stats(7.0, 13.0))]
    assert divergence.restart_step(jumped, 20) == 4
    # saved every step: the jump at 5 was made by checkpoint 4's parameters, so 3
    every = [(3, _stats(4.0, 11.0)), (4, _stats(3.9, 11.0)), (5, _stats(8.0, 11.5))]
    assert divergence.restart_step(every, 20) == 3
    # early checkpoints with a higher loss than later ones are not "blown up"
    falling = [(1, _stats(9.0, 10.0)), (2, _stats(5.0, 10.5)), (3, _stats(4.0, 11.0))]
    assert divergence.restart_step(falling, 10) == 3
    # nothing sound, no checkpoints, or only checkpoints without stats: from scratch
    assert divergence.restart_step([(1, _stats(5.0, 1e9))], 3) == 0
    assert divergence.restart_step([], 3) == 0
    assert divergence.restart_step([(2, None), (4, None)], 9) == 0
    # negative control: a rule that ignores the norm would restart from the exploded weights
    assert not divergence.sound(blown[2][1], 3.5) and blown[2][1]["loss"] <= 1.5 * 3.5


def test_report_lists_every_checkpoint_and_marks_the_choice():
    lines = divergence.report([(2, _stats(5.0, 11.0)), (4, _stats(4.5, 2e3))], 5, "/w/ckpt")
    assert lines[0] == "checkpoints in /w/ckpt:" and len(lines) == 3
    assert "step 2: training loss 5, parameter norm 11 (1.1x the initial 10)  <- restart here" \
        in lines[1]
    assert "step 4: training loss 4.5" in lines[2] and "(blown up)" in lines[2]


def test_restart_command_replaces_rate_and_step():
    argv = ["--config=experiments/lm.py:smoke", "--workdir", "/tmp/a b", "--config.optim.lr",
            "1e9", "--resume_step=3", "--config.train.steps=6"]
    command = restart_command(argv, 2, 1e8)
    assert shlex.split(command) == [
        "python", "-m", "ttt.main", "--config=experiments/lm.py:smoke", "--workdir", "/tmp/a b",
        "--config.train.steps=6", "--config.optim.lr=1e+08", "--resume_step=2"]


# --------------------------------------------------------------------------- toy model, in process


def _run(workdir, resume_step=None, data=None, **train):
    config = toy.toy_config("lm", **train)
    config.data.update(data or {})
    return train_and_evaluate(config, str(workdir), build_model=toy.build_model,
                              make_dataset=toy.make_dataset, resume_step=resume_step)


def _snapshot(workdir):
    """{relative path: (size, mtime_ns)} of every file under `workdir`."""
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            path = os.path.join(root, f)
            st = os.stat(path)
            out[os.path.relpath(path, workdir)] = (st.st_size, st.st_mtime_ns)
    return out


class _CheckpointLines(logging.Handler):
    """Records (N, committed on disk?) for each 'checkpoint: step N' line when it is logged."""

    def __init__(self, directory):
        super().__init__()
        self.directory, self.seen = directory, []

    def emit(self, record):
        match = re.match(r"checkpoint: step (\d+)", record.getMessage())
        if match:
            step_dir = os.path.join(self.directory, match.group(1))
            self.seen.append((int(match.group(1)),
                              os.path.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA"))))


def test_checkpoint_stats_commit_lines_finished_runs_and_resume_step(tmp_path, caplog):
    """One toy run, then what a rerun of its workdir does (each part names what it checks)."""
    caplog.set_level(logging.INFO, logger="ttt")
    lines = _CheckpointLines(str(tmp_path / "checkpoints"))
    logging.getLogger("ttt").addHandler(lines)
    try:
        summary = _run(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=5, log_every=1,
                       async_checkpoints=True)
    finally:
        logging.getLogger("ttt").removeHandler(lines)
    # 'checkpoint: step N' only once N has committed (async saves)
    assert lines.seen == [(2, True), (4, True), (6, True)], lines.seen

    # each checkpoint holds the loss of its step (as metrics.jsonl logged it) and the norm of
    # its parameters
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))}
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    try:
        stats = {s: ckpt.stats(s) for s in (2, 4, 6)}
    finally:
        ckpt.close()
    for step, st in stats.items():
        assert st["loss"] == pytest.approx(rows[step]["train/loss"], rel=1e-6), step
    norm = float(optax.tree.norm(summary["state"].params))
    assert stats[6]["param_norm"] == pytest.approx(norm, rel=1e-6)
    assert stats[2]["init_param_norm"] == stats[6]["init_param_norm"] > 0
    assert stats[2]["param_norm"] != stats[6]["param_norm"]  # negative control: not a constant

    # the same run again: done already, nothing written; fewer steps: one-line error
    before = _snapshot(tmp_path)
    caplog.clear()
    assert _run(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=5)["step"] == 6
    assert "done already: step 6 of 6" in caplog.text and "done: step" not in caplog.text
    with pytest.raises(ValueError, match=r"^config\.train\.steps=3: the run in .* is already at "
                                         r"step 6; nothing was changed"):
        _run(tmp_path, steps=3, checkpoint_every=2)
    # --resume_step of a step it does not hold: one line, nothing moved
    with pytest.raises(ValueError, match=r"^--resume_step=3: .* has no checkpoint 3 \(it has "
                                         r"\[2, 4, 6\]\)"):
        _run(tmp_path, resume_step=3, steps=6, checkpoint_every=2, keep_checkpoints=5)
    assert _snapshot(tmp_path) == before  # config.json, metrics, checkpoints untouched

    # --resume_step=2: 4 and 6 are moved aside (not deleted) and trained again
    at2 = _snapshot(tmp_path / "checkpoints" / "2")
    assert _run(tmp_path, resume_step=2, steps=6, checkpoint_every=2, keep_checkpoints=5,
                log_every=1)["step"] == 6
    aside = sorted(d.split(".")[0] for d in os.listdir(tmp_path / "diverged_checkpoints"))
    assert aside == ["4", "6"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6"]
    assert _snapshot(tmp_path / "checkpoints" / "2") == at2
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step once, in order


# --------------------------------------------------------------------------- the real tiny LM, CLI

TINY = ["--config.model.num_layers=1", "--config.model.width=16", "--config.model.num_heads=2",
        "--config.model.ffn_dim=32", "--config.data.seq_len=16", "--config.train.eval_every=0",
        "--config.train.checkpoint_every=1", "--config.train.log_every=1",
        "--config.optim.warmup_steps=2", "--config.train.steps=5", "--config.train.progress=false"]


def _cli(args, cache, timeout=400):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-m", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def test_diverged_run_then_advised_restart_trains_to_a_finite_loss(tmp_path):
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    config = f"--config={os.path.join(ROOT, 'experiments', 'lm.py')}:ttt_linear,smoke"
    rc, err = _cli(["ttt.main", config, f"--workdir={workdir}", *TINY,
                    "--config.optim.lr=1e9"], cache)
    assert rc == 3 and "Traceback" not in err, err[-3000:]
    block = err[err.index("error: training loss is"):].strip().splitlines()
    # warm-up: step 1 runs at rate 0 (checkpoint 1 = the initial weights), step 2 at 5e8
    assert re.match(r"error: training loss is nan at step \d; stopping\. The newest checkpoint "
                    r"\(step \d\) .* restart from step 1 ", block[0]), block
    assert block[1] == f"checkpoints in {workdir}/checkpoints:"
    assert re.match(r"  step 1: training loss [\d.]+, parameter norm [\d.]+ \(1x the initial "
                    r"[\d.]+\)  <- restart here$", block[2]), block
    assert re.match(r"  step 2: training loss [\d.]+, .*e\+\d+x the initial .*\(blown up\)$",
                    block[3]), block
    assert block[-2].startswith("to restart from step 1 with a 10x lower rate (now "
                                "config.optim.lr=1e+09")
    command = shlex.split(block[-1])
    assert command[:3] == ["python", "-m", "ttt.main"] and command[-2:] == [
        "--config.optim.lr=1e+08", "--resume_step=1"], command
    held = sorted(os.listdir(workdir / "checkpoints"), key=int)
    # the advised command with a sane rate, in the same workdir
    command[-2] = "--config.optim.lr=3e-3"
    rc, err = _cli(command[2:], cache)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert f"resume_step=1: checkpoints {[int(s) for s in held[1:]]} moved to " in err, err[-2000:]
    assert "resumed from checkpoint step 1" in err
    assert re.search(r"done: step 5 of 5; .*train loss [\d.]+;", err), err[-2000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    try:
        stats = [ckpt.stats(s) for s in ckpt.all_steps()]
    finally:
        ckpt.close()
    assert all(s["param_norm"] < 10 * s["init_param_norm"] for s in stats), stats
    assert len(os.listdir(workdir / "diverged_checkpoints")) == len(held) - 1
    # the same command once more: already done, nothing changes; fewer steps: exit 2, one line
    before = _snapshot(workdir)
    again = command[2:-1]  # without --resume_step
    rc, err = _cli(again, cache)
    assert rc == 0 and "done already: step 5 of 5" in err, err[-2000:]
    fewer = [a if a != "--config.train.steps=5" else "--config.train.steps=3" for a in again]
    rc, err = _cli(fewer, cache)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("error: config.train.steps=3: the run in ")
    assert _snapshot(workdir) == before
