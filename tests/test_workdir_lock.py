"""The workdir lock (`ttt.train.lock.WorkdirLock`): one training process per workdir. A second
run stops in one line naming the holder and touches nothing; a lock left by a dead process is taken
over with a warning; the lock goes with the run, exceptions included; end to end through
`python -m ttt.main`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import toy
from test_main import TINY, _env

from ttt.train.lock import LOCK_NAME, WorkdirLock
from ttt.train.train import train_and_evaluate
from ttt.train.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the lock of argv[1] until its stdin closes.
HOLD = """
import sys
from ttt.train.lock import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A subprocess holding the lock of tmp_path / "work" (released when the test ends)."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield workdir, proc
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert not (workdir / LOCK_NAME).exists()  # the holder removed it on release


def _snapshot(workdir):
    """Every file under `workdir` with its size and mtime."""
    out = {}
    for base, _, files in os.walk(workdir):
        for name in files:
            st = os.stat(os.path.join(base, name))
            out[os.path.relpath(os.path.join(base, name), workdir)] = (st.st_size, st.st_mtime_ns)
    return out


def test_lock_round_trip(tmp_path):
    path = tmp_path / LOCK_NAME
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.path == str(path) and path.exists()
        info = json.loads(path.read_text())
        assert set(info) == {"host", "pid", "start", "command"}
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        start = datetime.datetime.fromisoformat(info["start"])
        assert start.utcoffset() == datetime.timedelta(0)
        assert before <= start <= datetime.datetime.now(datetime.UTC)
        assert info["command"].startswith("python ")
        # the same process again: held (the flock of another open file)
        with pytest.raises(WorkdirError, match=f"pid {os.getpid()} "):
            WorkdirLock(str(tmp_path)).acquire()
    assert not path.exists()
    with WorkdirLock(str(tmp_path)):  # free again
        assert path.exists()
    assert os.listdir(tmp_path) == []


def test_second_acquirer_is_refused_and_touches_nothing(holder):
    workdir, proc = holder
    (workdir / "config.json").write_text("{}")
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / "x").write_text("state")
    before = _snapshot(workdir)
    with pytest.raises(WorkdirError) as err:
        WorkdirLock(str(workdir)).acquire()
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"workdir {workdir} is in use by pid {proc.pid} on host "
                              f"{socket.gethostname()} since "), message
    assert "wait for it to finish or pick another --workdir" in message
    assert _snapshot(workdir) == before
    assert sorted(os.listdir(workdir)) == sorted(["config.json", "checkpoints", LOCK_NAME])


def test_training_refused_while_locked(holder):
    """In process, with the toy model: train_and_evaluate stops before reading data or writing."""
    workdir, proc = holder
    called = []

    def make_dataset(*args, **kwargs):
        called.append(args)
        return toy.make_dataset(*args, **kwargs)

    before = _snapshot(workdir)
    with pytest.raises(WorkdirError, match=f"in use by pid {proc.pid} on host "):
        train_and_evaluate(toy.toy_config("lm"), str(workdir), build_model=toy.build_model,
                           make_dataset=make_dataset)
    assert not called and _snapshot(workdir) == before


def test_training_holds_the_lock_and_releases_it(tmp_path):
    seen = []

    def make_dataset(*args, **kwargs):  # runs while the workdir is locked
        seen.append(json.loads((tmp_path / LOCK_NAME).read_text())["pid"])
        return toy.make_dataset(*args, **kwargs)

    summary = train_and_evaluate(toy.toy_config("lm", steps=2), str(tmp_path),
                                 build_model=toy.build_model, make_dataset=make_dataset)
    assert summary["step"] == 2 and seen and set(seen) == {os.getpid()}
    assert not (tmp_path / LOCK_NAME).exists()

    def broken(*args, **kwargs):
        raise RuntimeError("no data")

    with pytest.raises(RuntimeError, match="no data"):
        train_and_evaluate(toy.toy_config("lm", steps=2), str(tmp_path),
                           build_model=toy.build_model, make_dataset=broken)
    assert not (tmp_path / LOCK_NAME).exists()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = _dead_pid()
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid,
                                "start": "2026-01-01T00:00:00+00:00",
                                "command": "python -m ttt.main --workdir=x"}))
    with caplog.at_level(logging.WARNING, logger="ttt"):
        with WorkdirLock(str(tmp_path)):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"pid {pid} on host {socket.gethostname()} since 2026-01-01" in warnings[0]
    assert "no longer runs" in warnings[0] and str(path) in warnings[0]


def test_garbled_lock_with_a_free_flock_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text("")  # a holder that died before writing it
    with caplog.at_level(logging.WARNING, logger="ttt"):
        with WorkdirLock(str(tmp_path)):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any("flock is free" in r.getMessage() for r in caplog.records)


def test_another_hosts_lock_counts_as_held(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "elsewhere.invalid", "pid": _dead_pid(),
                                "start": "2026-01-01T00:00:00+00:00", "command": "python x"}))
    with pytest.raises(WorkdirError) as err:
        WorkdirLock(str(tmp_path)).acquire()
    message = str(err.value)
    assert "\n" not in message and "on host elsewhere.invalid" in message
    assert f"if host elsewhere.invalid is gone and nothing runs there, remove {path}" in message
    assert path.exists()


def test_released_after_an_exception(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with WorkdirLock(str(tmp_path)):
            assert (tmp_path / LOCK_NAME).exists()
            raise ValueError("boom")
    assert not (tmp_path / LOCK_NAME).exists()
    WorkdirLock(str(tmp_path)).acquire().release()


def test_cli_second_run_on_a_workdir_exits_2(tmp_path):
    """Two `python -m ttt.main` on one workdir: the second stops in one line (exit 2), the first
    finishes. The first is paused (SIGSTOP) while it holds the lock, so the order is fixed."""
    workdir, cache = tmp_path / "work", tmp_path / "cache"
    argv = [sys.executable, "-m", "ttt.main",
            f"--config={os.path.join(ROOT, 'experiments', 'lm.py')}:ttt_linear,smoke",
            f"--workdir={workdir}", *TINY["lm"], "--config.train.steps=2",
            "--config.train.checkpoint_every=1", "--config.train.global_batch_size=8",
            "--config.train.eval_every=0"]
    first = subprocess.Popen(argv, env=_env(cache), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 120
        while not (workdir / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < end, "the first run never took the lock"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        try:
            before = _snapshot(workdir)
            second = subprocess.run(argv, env=_env(cache), cwd=ROOT, capture_output=True,
                                    text=True, timeout=120)
            assert _snapshot(workdir) == before
        finally:
            first.send_signal(signal.SIGCONT)
        err = second.stderr.strip()
        assert second.returncode == 2, err[-3000:]
        assert "\n" not in err, err[-3000:]
        assert err.startswith(f"error: workdir {workdir} is in use by pid {first.pid} on host "
                              f"{socket.gethostname()} since "), err
        assert "(python -m ttt.main --config=" in err, err
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, first_err[-3000:]
    assert "done: step 2 of 2" in first_err, first_err[-3000:]
    saved = json.load(open(workdir / "config.json"))
    assert saved["train"]["steps"] == 2 and saved["model"]["width"] == 16
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    assert not (workdir / LOCK_NAME).exists()
