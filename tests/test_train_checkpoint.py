"""Checkpoints and faults: SIGTERM saves, SIGKILL + restart resumes to the bit, a corrupt latest
checkpoint falls back to the previous one, a non-finite loss stops without saving, float32 on disk,
retention of the last k plus milestones. Stand-in model (tests/toy.py), and the real tiny LM for
SIGKILL + rerun and the non-finite stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import toy

from ttt.train import Checkpointer, NonFiniteLossError
from ttt.train import checkpoint as ckpt_lib
from ttt.train.checkpoint import check_full_precision
from ttt.train.setup import abstract_state, build_setup, resolve_config
from ttt.train.train import train_and_evaluate
from ttt.train.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, data=None, **train):
    config = toy.toy_config("lm", **train)
    config.data.update(data or {})
    return train_and_evaluate(config, str(workdir), build_model=toy.build_model,
                              make_dataset=toy.make_dataset)


def _state_at(workdir, step, mixer=None):
    """TrainState of checkpoint `step` (host arrays); `mixer`: of the real tiny LM."""
    from ttt.models import build_model

    config = toy.real_config(mixer) if mixer else toy.toy_config("lm")
    meta = toy.make_dataset(config.data, "train", 8, seed=0).meta
    abstract = abstract_state(build_setup(resolve_config(config, meta), meta,
                                          build_model if mixer else toy.build_model))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                          abstract)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    ckpt.close()
    return jax.device_get(state)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _launch(workdir, cache, delay_s=0.0, mixer=None, steps=8):
    """`python tests/toy.py` (the stand-in, or with `mixer` the real tiny LM) in a subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    train = json.dumps({"steps": steps, "checkpoint_every": 2, "log_every": 1})
    model = ["--mixer", mixer] if mixer else []
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "toy.py"), "--workdir", str(workdir),
         "--train", train, "--data", json.dumps({"delay_s": delay_s}), *model],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(proc, predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out waiting for a checkpoint")


def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(tmp_path):
    cache, ref, run = tmp_path / "cache", tmp_path / "ref", tmp_path / "run"
    p = _launch(ref, cache)
    out = p.communicate(timeout=240)[0].decode()
    assert p.returncode == 0, out[-3000:]

    # 1) preemption: SIGTERM once step 2 is on disk -> a checkpoint at the current step, exit 143
    p = _launch(run, cache, delay_s=0.3)
    _wait_for(p, lambda: os.path.isdir(run / "checkpoints" / "2"))
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0].decode()
    assert p.returncode == 143, out[-3000:]
    preempted_at = _steps(run)[-1]
    assert 2 <= preempted_at < 8

    # 2) the restart resumes; SIGKILL it after its first new checkpoint (no chance to clean up)
    p = _launch(run, cache, delay_s=0.3)
    _wait_for(p, lambda: _steps(run)[-1] > preempted_at)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    killed_at = _steps(run)[-1]
    assert killed_at < 8, "the run finished before it could be killed"

    # 3) the same command again finishes the run
    p = _launch(run, cache)
    out = p.communicate(timeout=240)[0].decode()
    assert p.returncode == 0, out[-3000:]
    logged = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert logged.count(1) == 1 and logged[-1] == 8  # restarts continued, never began anew

    final, expected = _state_at(str(run), 8), _state_at(str(ref), 8)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: parameters, Adam moments, step, rng
    # negative control: the run really moved between checkpoints
    earlier = _state_at(str(ref), 6).params
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(final.params), jax.tree.leaves(earlier), strict=True))


def test_real_model_sigkill_then_rerun_is_bitwise_identical(tmp_path):
    """The real TTT-Linear LM (tiny preset; diagnostics on the logged steps): SIGKILL after a
    checkpoint, then the same command again, ends bitwise equal to the uninterrupted run."""
    cache, ref, run = tmp_path / "cache", tmp_path / "ref", tmp_path / "run"
    p = _launch(ref, cache, mixer="ttt_linear", steps=6)
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out[-3000:]
    p = _launch(run, cache, delay_s=0.3, mixer="ttt_linear", steps=6)
    _wait_for(p, lambda: os.path.isdir(run / "checkpoints" / "2"), timeout=240)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL
    killed_at = _steps(run)[-1]
    assert killed_at < 6, "the run finished before it could be killed"
    p = _launch(run, cache, mixer="ttt_linear", steps=6)
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out[-3000:]
    logged = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [x["step"] for x in logged].count(1) == 1 and logged[-1]["step"] == 6
    assert any("train/aux/inner_loss_after" in k for k in logged[-1])  # the real TTT layer
    final, expected = _state_at(str(run), 6, "ttt_linear"), _state_at(str(ref), 6, "ttt_linear")
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: parameters, Adam moments, step, rng
    earlier = _state_at(str(ref), killed_at, "ttt_linear").params  # negative control
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(final.params), jax.tree.leaves(earlier), strict=True))


def test_real_model_non_finite_loss_keeps_last_good_checkpoint(tmp_path):
    from ttt.models import build_model

    config = toy.real_config("ttt_mlp", steps=6, checkpoint_every=2, log_every=100)
    config.model.mixer_kwargs = {"stats": False}
    config.data.nan_from = 3  # batch index 3 (step 4) has a NaN mask
    with pytest.raises(NonFiniteLossError, match=r"step 4.*checkpoint \(step 2\)"):
        train_and_evaluate(config, str(tmp_path), build_model=build_model,
                           make_dataset=toy.make_dataset)
    assert _steps(tmp_path) == [2]
    params = _state_at(str(tmp_path), 2, "ttt_mlp").params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert "ttt_dense_1" in params["h"]["seq_modeling_block"]  # the real TTT-MLP layer


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    _run(tmp_path, steps=4, checkpoint_every=2)
    at2 = _state_at(str(tmp_path), 2)
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for f in files:  # overwrite every data file of the latest step
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    caplog.set_level(logging.WARNING, logger="ttt")
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), at2)
    step, state, data = ckpt.restore(target)
    assert step == 2 and data == {"next_index": 2}
    assert any("could not be restored" in r.getMessage() for r in caplog.records)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(at2), strict=True):
        np.testing.assert_array_equal(a, b)
    # the unreadable step is moved aside (not deleted), so the resumed run can write step 4 again
    assert ckpt.all_steps() == [2] and os.listdir(tmp_path / "corrupt_checkpoints")
    assert ckpt.save(4, state, data)
    ckpt.close()


@pytest.mark.parametrize("log_every", [pytest.param(1, marks=pytest.mark.slow), 100])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, log_every):
    # batch index 3 (step 4) has a NaN mask; detection at the log step or before the save
    with pytest.raises(NonFiniteLossError, match=r"step 4.*checkpoint \(step 2\)"):
        _run(tmp_path, data={"nan_from": 3}, steps=6, checkpoint_every=2, log_every=log_every)
    assert _steps(tmp_path) == [2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_state_at(str(tmp_path), 2).params))


def test_bf16_compute_checkpoints_float32(tmp_path):
    config = toy.toy_config("lm")
    config.model.dtype = "bfloat16"
    meta = toy.make_dataset(config.data, "train", 8, seed=0).meta
    setup = build_setup(resolve_config(config, meta), meta, toy.build_model)
    state = setup.placement.place_state(setup.create_state)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(1, state, {"next_index": 1})
    ckpt.close()
    params = _state_at(str(tmp_path), 1).params
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    with pytest.raises(TypeError, match="bfloat16"):  # negative control
        check_full_precision({"w": jnp.ones((2,), jnp.bfloat16)})


def test_keeps_last_k_plus_milestones(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"), keep=2, keep_every=4, async_save=False)
    state = {"w": np.arange(3, dtype=np.float32)}
    for step in range(1, 10):
        ckpt.save(step, state, {"next_index": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 9]
    target = {"w": jax.ShapeDtypeStruct((3,), np.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(
                                            jax.devices()[0]))}
    step, restored, data = ckpt.restore(target)
    assert step == 9 and data == {"next_index": 9}
    np.testing.assert_array_equal(restored["w"], state["w"])
    ckpt.close()


def test_another_train_state_is_refused_not_called_corrupt(tmp_path):
    """A checkpoint that reads but holds another optimizer state (clipping off adds no state,
    on adds a chain element) stops the run with one line; nothing is moved or written."""
    _run(tmp_path, steps=2, checkpoint_every=2)
    before = {f: os.path.getmtime(tmp_path / f) for f in ("config.json", "metrics.jsonl")}
    config = toy.toy_config("lm", steps=4, checkpoint_every=2)
    config.optim.clip = 0.0
    with pytest.raises(ckpt_lib.CheckpointMismatchError) as err:
        train_and_evaluate(config, str(tmp_path), build_model=toy.build_model,
                           make_dataset=toy.make_dataset)
    message = str(err.value)
    assert "\n" not in message and "does not fit" in message and "opt_state" in message
    assert "optim.clip: 1.0 there, 0.0 here" in message, message
    assert _steps(tmp_path) == [2] and not os.path.exists(tmp_path / "corrupt_checkpoints")
    assert before == {f: os.path.getmtime(tmp_path / f) for f in before}
    # the same through Checkpointer.restore: a structure mismatch raises, never quarantines
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    wrong = {"w": jax.ShapeDtypeStruct((3,), np.float32,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0]))}
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="w missing; unexpected opt_state"):
        ckpt.restore(wrong)
    assert ckpt.all_steps() == [2]
    ckpt.close()


def test_workdir_of_another_model_is_refused_before_anything(tmp_path):
    _run(tmp_path, steps=2, checkpoint_every=2)
    files = {f: open(tmp_path / f, "rb").read() for f in ("config.json", "metrics.jsonl")}
    config = toy.toy_config("lm", steps=4)
    config.model.mixer = "ttt_mlp"
    config.data.seq_len = 32
    with pytest.raises(WorkdirError) as err:
        train_and_evaluate(config, str(tmp_path), build_model=toy.build_model,
                           make_dataset=toy.make_dataset)
    message = str(err.value)
    assert "\n" not in message and "new --workdir" in message
    assert "data.seq_len: 16 there, 32 here" in message
    assert "model.mixer: 'ttt_linear' there, 'ttt_mlp' here" in message
    assert files == {f: open(tmp_path / f, "rb").read() for f in files}
    assert _steps(tmp_path) == [2] and not os.path.exists(tmp_path / "corrupt_checkpoints")
    # settings that change how, not what, a run computes may differ on resume
    config = toy.toy_config("lm", steps=3, checkpoint_every=100)
    config.model.dtype = "bfloat16"
    assert train_and_evaluate(config, str(tmp_path), build_model=toy.build_model,
                              make_dataset=toy.make_dataset)["step"] == 3


def _garble_arrays(workdir, step):
    """Overwrite the array files of `step` but not its metadata: orbax fails mid-read."""
    for sub in ("d", "ocdbt.process_0"):
        for root, _, files in os.walk(workdir / "checkpoints" / str(step) / "state" / sub):
            for f in files:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")


def test_unreadable_checkpoint_is_set_aside_without_stray_tracebacks(tmp_path, monkeypatch):
    """Orbax fails with reads still in flight; their late callbacks find its event loop closed
    and Python reports each as an 'unraisable' RuntimeError (a traceback on stderr each), some
    before the read's error. A restore drops those, and only those, from its first read on, and
    keeps the filter only if it set a checkpoint aside."""
    seen = []
    mine = lambda u: seen.append(u.exc_value)
    monkeypatch.setattr(sys, "unraisablehook", mine)
    _run(tmp_path, steps=4, checkpoint_every=2)
    _run(tmp_path, steps=4, checkpoint_every=2)  # resumes from a readable step 4
    assert sys.unraisablehook is mine  # nothing set aside: the hook is as it was
    _garble_arrays(tmp_path, 4)
    summary = _run(tmp_path, steps=5, checkpoint_every=100)
    time.sleep(1.0)  # any read still in flight finishes on tensorstore's threads
    assert summary["step"] == 5 and os.listdir(tmp_path / "corrupt_checkpoints")
    assert not [e for e in seen if str(e) == "Event loop is closed"]
    # the filter that set-aside installed: exactly those dropped, everything else passed on
    report = lambda err: sys.unraisablehook(types.SimpleNamespace(
        exc_type=type(err), exc_value=err, exc_traceback=None, err_msg=None, object=None))
    report(RuntimeError("Event loop is closed"))
    report(RuntimeError("something else"))
    report(ValueError("Event loop is closed"))
    assert [f"{type(e).__name__}: {e}" for e in seen] == [
        "RuntimeError: something else", "ValueError: Event loop is closed"]


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    with pytest.raises(NonFiniteLossError, match="No checkpoint had been saved yet") as err:
        _run(tmp_path, data={"nan_from": 0}, steps=3, checkpoint_every=100, log_every=1)
    assert "None" not in str(err.value)
