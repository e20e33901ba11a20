"""I/O faults and signals, through the real tiny LM and the command lines: a checkpoint save that
cannot be written (a file size limit, RLIMIT_FSIZE, makes every write past a few KB fail the way a
full disk does: inside tensorstore's C++ writer, in orbax's background thread), an evaluation
whose output directory cannot be written, cut-off result files and torn metrics lines for the
readers (compare, report, evaluate's reuse), metrics.jsonl cut back on resume, SIGINT, and
out-of-memory errors. Each asserts the exit status, one line without a traceback, and what is on
disk afterwards (nothing lost or changed that should not be).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from ttt import cli, files
from ttt.errors import ResourceError, disk_error, out_of_memory, out_of_memory_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(ROOT, "experiments", "lm.py")
# the smallest real LM (as tests/test_main.py), 4 steps, a checkpoint and an eval every 2
TINY = [f"--config={LM}:ttt_linear,smoke", "--config.model.num_layers=1",
        "--config.model.width=16", "--config.model.num_heads=2", "--config.model.ffn_dim=32",
        "--config.data.seq_len=16", "--config.train.global_batch_size=8",
        "--config.train.steps=4", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=2", "--config.train.log_every=1",
        "--config.train.progress=false"]


def _env(cache) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1",
                XLA_FLAGS="--xla_force_host_platform_device_count=8",
                JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _limit_file_size(limit: int):
    """preexec_fn: every write past `limit` bytes of a file fails with EFBIG ('File too large'),
    as on a full disk, instead of killing the process (SIGXFSZ ignored)."""
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def _cli(module: str, args: list[str], cache, *, file_limit: int | None = None,
         timeout: float = 300) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], env=_env(cache), cwd=ROOT, capture_output=True,
        text=True, timeout=timeout,
        preexec_fn=_limit_file_size(file_limit) if file_limit is not None else None)
    return proc.returncode, proc.stderr


def _one_error_line(err: str, *needles: str) -> str:
    """The single 'error: ...' line of `err` (asserting there is one and no traceback)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _digest(directory) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]  # every line parses: no torn line left


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run stopped at step 2 of 4 (checkpoint 2, metrics of steps 1-2, an eval at step 2),
    and the compilation cache every run of this module shares (same shapes, same schedule)."""
    root = tmp_path_factory.mktemp("faults_io")
    workdir, cache = root / "base", root / "cache"
    rc, err = _cli("ttt.main", [*TINY, f"--workdir={workdir}", "--config.train.stop_at=2"], cache)
    assert rc == 0, err[-3000:]
    return workdir, cache


def _copy(base, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(base[0], workdir)
    return workdir


# --------------------------------------------------------------------------- failed saves


def test_failed_save_is_one_line_and_keeps_the_last_checkpoint(base, tmp_path):
    workdir, cache = _copy(base, tmp_path), base[1]
    before = _digest(workdir / "checkpoints" / "2")
    config_before = json.loads((workdir / "config.json").read_text())
    rc, err = _cli("ttt.main", [*TINY, f"--workdir={workdir}"], cache, file_limit=8000)
    assert rc == 2, err[-3000:]
    line = _one_error_line(err, f"checkpoint save failed in {workdir}/checkpoints",
                           "file size limit exceeded", "needs about",
                           "step 2, is intact", "rerun the same command")
    assert "free there" in line
    assert "checkpoint: step 4" not in err  # nothing announced that did not commit
    assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == ["2"]
    assert _digest(workdir / "checkpoints" / "2") == before  # the last committed one, intact
    config_after = files.read_json(str(workdir / "config.json"))  # whole (written atomically)
    assert {k: config_after[k] for k in ("model", "data", "optim")} == \
        {k: config_before[k] for k in ("model", "data", "optim")}
    # a kill mid-write of metrics.jsonl on top: the torn last line goes on resume
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')
    # the same command without the limit resumes from step 2 and finishes; metrics.jsonl holds
    # every step once, in order (the rows the failed invocation wrote after step 2 were cut)
    rc, err = _cli("ttt.main", [*TINY, f"--workdir={workdir}"], cache)
    assert rc == 0, err[-3000:]
    assert "resumed from checkpoint step 2" in err and "done: step 4 of 4" in err
    assert "metrics.jsonl: 4 lines after step 2 dropped" in err  # train 3, 4, eval 4, torn
    rows = _rows(workdir)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]
    assert sorted(d for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == ["2", "4"]


def test_metric_writer_cuts_back_to_the_restored_step(tmp_path):
    from ttt.train.metrics import MetricWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": float(s)}) + "\n"
                            for s in (1, 2, 3, 4)) + '{"step": 5, "tr')
    writer = MetricWriter(str(tmp_path), start=2)
    writer.write(3, {"loss": 30.0}, "train/")
    writer.close()
    rows = _rows(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert writer.dropped == 3  # steps 3, 4 and the torn line
    # negative control: appending without the cut leaves duplicates and a broken line
    path.write_text(json.dumps({"step": 3, "train/loss": 3.0}) + "\n" + '{"step": 4, "tr')
    writer = MetricWriter(str(tmp_path))
    writer.write(3, {"loss": 30.0}, "train/")
    writer.close()
    with pytest.raises(json.JSONDecodeError):
        _rows(tmp_path)


def test_atomic_write_failure_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    files.write_json_atomic(str(path), {"loss": 1.0})
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as info:
        files.write_json_atomic(str(path), {"loss": 2.0, "more": list(range(100))})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert disk_error(info.value) == "no space left on the device"
    assert files.read_json(str(path)) == {"loss": 1.0}
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left behind
    # the readers: a cut-off JSON is None, a torn JSON-lines row is dropped
    path.write_text('{"loss": 1.0, "loss_by')
    assert files.read_json(str(path)) is None
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert files.read_jsonl(str(tmp_path / "m.jsonl")) == [{"step": 1}, {"step": 2}]


# --------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_an_unwritable_output_before_evaluating(base, tmp_path):
    workdir, cache = _copy(base, tmp_path), base[1]
    start = time.perf_counter()
    rc, err = _cli("ttt.evaluate", [f"--workdir={workdir}"], cache, file_limit=0)
    assert rc == 2, err[-3000:]
    _one_error_line(err, f"cannot write to {workdir}/eval", "--out=DIR")
    assert time.perf_counter() - start < 30  # refused up front, not after the evaluation
    assert not os.listdir(workdir / "eval")  # nothing written (the probe removed itself)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = _cli("ttt.evaluate", [f"--workdir={workdir}", f"--out={blocker}/eval"], cache)
    assert rc == 2, err[-3000:]
    _one_error_line(err, f"cannot write to {blocker}/eval")


def test_evaluate_keeps_one_file_per_setting_and_redoes_a_cut_off_one(base, tmp_path, capsys,
                                                                      monkeypatch):
    """In this process (the command line's main; its failures are the subprocess tests'). The
    whole validation split in batches of 1024 windows (the batch does not change a whole-split
    result, nor its file name)."""
    from experiments import scheduler
    from ttt import evaluate
    from ttt.evaluate import read_result, result_name

    workdir = _copy(base, tmp_path)
    assert evaluate.main([f"--workdir={workdir}", "--batch_size=1024"]) == 0
    whole = (workdir / "eval" / "validation.json").read_bytes()
    assert evaluate.main([f"--workdir={workdir}", "--max_batches=1"]) == 0
    out = capsys.readouterr().out
    assert "validation_max1.json" in out and "validation_max1_loss_by_position.png" in out
    assert (workdir / "eval" / "validation.json").read_bytes() == whole  # not replaced
    assert sorted(os.listdir(workdir / "eval")) == [
        "validation.json", "validation_loss_by_position.png", "validation_max1.json",
        "validation_max1_loss_by_position.png"]
    partial = read_result(str(workdir / "eval" / "validation_max1.json"))
    assert partial["batches"] == 1 and read_result(str(workdir / "eval" / "validation.json"))[
        "tokens"] > partial["tokens"]
    assert result_name("validation", seq_len=1024) == "validation_seq1024"
    assert result_name("test", max_batches=2, batch_size=8, step=200) == "test_max2_b8_step200"
    # evaluate's reuse in a comparison: a cut-off validation.json is evaluated again
    (workdir / "eval" / "validation.json").write_bytes(whole[: len(whole) // 2])
    assert read_result(str(workdir / "eval" / "validation.json")) is None
    files.write_json_atomic(str(workdir / "run.json"), {"key": "k", "name": "n", "group": "lm"})
    monkeypatch.setattr(evaluate, "evaluate_run",
                        functools.partial(evaluate.evaluate_run, batch_size=1024))
    info = scheduler.run_one("k", "lm", "n", f"{LM}:ttt_linear,smoke", str(workdir), [],
                             by_position=True)
    assert "error" not in info, info
    redone = read_result(str(workdir / "eval" / "validation.json"))
    assert redone is not None and redone["tokens"] == json.loads(whole)["tokens"]


# --------------------------------------------------------------------------- compare / report


def test_report_survives_torn_metrics_and_cut_off_results(base, tmp_path):
    from experiments import report

    workdir = _copy(base, tmp_path)
    rows_before = _rows(workdir)
    with open(workdir / "metrics.jsonl", "a") as f:  # an older resume's duplicate + a torn line
        f.write(json.dumps(rows_before[0]) + "\n" + '{"step": 3, "train/lo')
    (workdir / "eval").mkdir(exist_ok=True)
    (workdir / "eval" / "validation.json").write_text('{"loss": 5.4, "loss_by_position": [5.')
    (workdir / "run.json").write_text('{"key": "lm/x/s0", "na')
    summary = report.summarize(str(workdir))
    assert summary["steps"] == 2 and len(summary["train_curve"][0]) == 2
    assert "loss_by_position" not in summary  # the cut-off evaluation is not used
    text = report.build_report([summary], str(tmp_path / "out"))
    assert "Language model" in text and os.path.isfile(tmp_path / "out" / "results.json")
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]  # no temporary files


# --------------------------------------------------------------------------- signals


def _stderr_lines(proc) -> tuple[list[str], threading.Thread]:
    lines: list[str] = []

    def pump():
        for line in proc.stderr:
            lines.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


def _wait_for_line(proc, lines, needle, timeout=240.0):
    end = time.time() + timeout
    while time.time() < end:
        if any(needle in line for line in lines):
            return
        assert proc.poll() is None, "".join(lines)[-3000:]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {needle!r} in time: {''.join(lines)[-3000:]}")


def _launch_long_run(workdir, cache):
    """The tiny LM on a schedule of 100,000 steps, stderr read line by line."""
    args = [*TINY, f"--workdir={workdir}", "--config.train.steps=100000",
            "--config.train.checkpoint_every=100000", "--config.train.eval_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "ttt.main", *args], env=_env(cache),
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    return (proc, *_stderr_lines(proc))


def test_sigint_saves_and_exits_130(base, tmp_path):
    """Ctrl-C on a long run: a checkpoint at the current step, one line, exit 130."""
    workdir, cache = tmp_path / "run", base[1]
    proc, lines, pump = _launch_long_run(workdir, cache)
    _wait_for_line(proc, lines, "compiled the train step")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    pump.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "SIGINT: saving a checkpoint at step" in err
    assert "interrupted (SIGINT) at step" in err and "checkpoint saved" in err
    saved = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and saved[0] > 0, saved
    assert f"checkpoint: step {saved[0]} -> " in err
    assert [r["step"] for r in _rows(workdir)][-1] == saved[0]


@pytest.mark.slow
def test_a_second_sigint_exits_at_once(base, tmp_path):
    """Two SIGINTs: the second does not wait for the checkpoint the first asked for (exit 130,
    one line); whatever is in checkpoints/ is a committed step or orbax's temporary directory."""
    workdir, cache = tmp_path / "run", base[1]
    proc, lines, pump = _launch_long_run(workdir, cache)
    _wait_for_line(proc, lines, "compiled the train step")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # (two signals at once reach Python's handler as one)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    pump.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert "SIGINT again: exiting at once" in err and "Traceback" not in err, err[-3000:]
    assert "interrupted (SIGINT) at step" not in err  # it did not wait for the checkpoint
    assert all(d.isdigit() or "orbax-checkpoint-tmp" in d
               for d in os.listdir(workdir / "checkpoints"))


def test_a_stopped_comparison_keeps_its_idle_worker_and_the_checkpoint(base, tmp_path,
                                                                    monkeypatch):
    """The comparison's pool (workers pinned to a core each) stopped
    (`experiments.scheduler._stop`, what SIGTERM to `experiments.compare` does) while one worker
    trains the real tiny LM and the other is idle: the trainer saves a checkpoint at its current
    step and returns; the idle worker, which the same SIGTERM reaches, holds it (`_pin`) instead
    of dying, which would break the pool and have the executor signal the saving worker again.
    Both exit on the pool's own shutdown (exit code 0: nothing killed), within seconds."""
    import concurrent.futures
    import multiprocessing

    from experiments import scheduler

    for key, value in _env(base[1]).items():  # what the spawned workers start with
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    overrides = [arg.removeprefix("--config.") for arg in TINY[1:]] + [
        "train.steps=100000", "train.checkpoint_every=100000", "train.eval_every=0"]
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx, initializer=scheduler._pin,
                                                  initargs=(ctx.Value("i", 0),))
    processes = []
    try:
        training = pool.submit(scheduler.run_one, "lm/ttt_linear/s0", "lm", "ttt_linear",
                               f"{LM}:ttt_linear,smoke", str(run_dir), overrides)
        idle = pool.submit(os.getpid)  # a second worker, idle once this returns
        idle_pid = idle.result(timeout=120)
        end = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists() or not _rows(run_dir):
            assert time.time() < end and not training.done(), training.exception()
            time.sleep(0.05)
        processes = list(pool._processes.values())
        assert len(processes) == 2 and idle_pid in {p.pid for p in processes}
        if len(os.sched_getaffinity(0)) > 1:  # each worker on a core of its own
            cores = [os.sched_getaffinity(p.pid) for p in processes]
            assert [len(c) for c in cores] == [1, 1] and cores[0] != cores[1], cores
        stopping = threading.Thread(target=scheduler._stop, daemon=True,
                                    args=(pool, {training: None}, True))
        stopping.start()
        stopping.join(timeout=90)  # (a broken pool's shutdown waits for ever)
        assert not stopping.is_alive(), "the pool did not stop"
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
    assert sorted(p.exitcode for p in processes) == [0, 0]  # neither died of the signal
    err = training.exception()
    assert isinstance(err, KeyboardInterrupt) and "checkpoint saved" in str(err), err
    saved = [int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit()]
    assert len(saved) == 1 and f"at step {saved[0]} " in str(err), (saved, err)
    assert (run_dir / "partial.json").exists() and not (run_dir / "run.json").exists()


def test_ctrl_c_and_out_of_memory_in_a_command_are_one_line(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.run(interrupted, []) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted (SIGINT): stopped before finishing"

    def oom(argv):  # what XLA raises when an allocation does not fit
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                           "17179869184 bytes.\nBufferAssignment OOM Debugging.")

    assert cli.run(oom, []) == 2
    line = _one_error_line(capsys.readouterr().err,
                           "allocate 17179869184 bytes", "config.train.global_batch_size",
                           "config.data.seq_len", "config.model.remat")
    assert line.count("\n") == 0

    def host_oom(argv):
        raise MemoryError

    assert cli.run(host_oom, []) == 2
    _one_error_line(capsys.readouterr().err, "host memory (MemoryError)")

    def other(argv):  # negative control: any other error is not dressed up as memory
        raise RuntimeError("INTERNAL: something else")

    with pytest.raises(RuntimeError, match="INTERNAL"):
        cli.run(other, [])


def test_fault_classification_reads_causes_and_cpp_messages():
    wrapped = ValueError("OUT_OF_RANGE: Error writing local file: Failed to write 561 bytes to "
                         "file 15: File too large [os_error_code='27']")
    assert disk_error(wrapped) == "file size limit exceeded"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert disk_error(outer) == "disk quota exceeded"
    assert disk_error(ValueError("NOT_FOUND: no such key")) is None  # negative control
    assert out_of_memory(ValueError("all good")) is None
    err = out_of_memory_error(MemoryError(), "training")
    assert isinstance(err, ResourceError) and "out of memory while training" in str(err)


def test_out_of_memory_while_compiling_the_train_step_is_one_error(tmp_path, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED from compiling the train step (injected) -> ResourceError naming
    the allocation and what to lower; nothing was saved. A run on the stand-in model."""
    import jax
    import toy

    from ttt.train import train_and_evaluate

    def no_memory(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68719476736 bytes.")

    monkeypatch.setattr(jax.stages.Lowered, "compile", no_memory)
    with pytest.raises(ResourceError) as info:
        train_and_evaluate(toy.toy_config("lm"), str(tmp_path), build_model=toy.build_model,
                           make_dataset=toy.make_dataset)
    message = str(info.value)
    assert message.startswith("out of memory while training") and "\n" not in message
    assert "allocate 68719476736 bytes" in message and "global_batch_size" in message
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    # negative control: another runtime error is not taken for memory
    def compiler_bug(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: a compiler bug")

    monkeypatch.setattr(jax.stages.Lowered, "compile", compiler_bug)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        train_and_evaluate(toy.toy_config("lm"), str(tmp_path / "b"),
                           build_model=toy.build_model, make_dataset=toy.make_dataset)


def test_a_failed_write_outside_the_checkpoints_names_the_file(tmp_path):
    from ttt.train import faults

    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))
    fault = faults.explain(err, str(tmp_path), 1 << 20)
    assert isinstance(fault, ResourceError)
    assert str(fault).startswith(f"writing {tmp_path}/metrics.jsonl failed: no space left")
    assert faults.explain(ValueError("bad value"), str(tmp_path), None) is None
