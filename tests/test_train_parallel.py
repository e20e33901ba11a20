"""One device, pmap over 8 and device meshes give the same training run; a checkpoint written on
the 8-device mesh restores onto one device; two `jax.distributed` CPU processes agree with one
process. The real model (tiny preset: TTT-Linear, TTT-MLP, TTT-Linear on the Mamba backbone and the
Transformer; float64 compute, so only summation order differs between the runs) under single,
pmap, mesh data=8 and mesh data=2 x fsdp=2 x model=2; the stand-in model (tests/toy.py) for the
cheaper checks of the placements themselves. 3 steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import toy
from conftest import assert_close

from ttt.train import Checkpointer, parallel
from ttt.train.setup import abstract_state, build_setup, resolve_config
from ttt.train.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs8 = pytest.mark.skipif(jax.device_count() < 8,
                            reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _run(workdir, **train):
    config = toy.toy_config("lm", **train)
    return train_and_evaluate(config, str(workdir), build_model=toy.build_model,
                              make_dataset=toy.make_dataset)


def _params_at(workdir, step, config=None, build_model=toy.build_model):
    """Parameters of checkpoint `step` in `workdir`, restored onto one device as host arrays."""
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    assert step in ckpt.all_steps(), ckpt.all_steps()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config = config or toy.toy_config("lm")
    meta = toy.make_dataset(config.data, "train", 8, seed=0).meta
    setup = build_setup(resolve_config(config, meta), meta, build_model)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          abstract_state(setup))
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    ckpt.close()
    return jax.device_get(state.params)


def _losses(workdir, key="train/loss"):
    return [json.loads(line)[key] for line in open(os.path.join(workdir, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- the real model

REAL = ("ttt_linear", "ttt_mlp", "ttt_linear_mamba", "softmax")
MODES = {"pmap": dict(parallel="pmap"),
         "data8": dict(parallel="mesh", mesh={"data": 8, "fsdp": 1, "model": 1}),
         "data2_fsdp2_model2": dict(parallel="mesh", mesh={"data": 2, "fsdp": 2, "model": 2})}


def _real_config(mixer, **train):
    config = toy.real_config(mixer, x64=True, steps=3, async_checkpoints=False, **train)
    # no diagnostics pass (it is its own compiled step; tests/test_train_steps.py has it)
    config.model.mixer_kwargs = {"stats": False} if mixer.startswith("ttt") else {}
    if mixer == "ttt_mlp":
        config.model.scan_layers = False  # unrolled layers: params h/0/..., h/1/...
    if mixer == "ttt_linear_mamba":
        config.model.remat = "block"
    return config


def _real_run(mixer, mode, root):
    """Train 3 steps of the real tiny LM under `mode` ("single" or a MODES key) in float64;
    (logged losses, logged gradient norms, parameters after step 3 on one device)."""
    from ttt.models import build_model

    workdir = os.path.join(root, f"{mixer}-{mode}")
    with jax.enable_x64(True):
        config = _real_config(mixer, **MODES.get(mode, {}))
        train_and_evaluate(config, workdir, build_model=build_model,
                           make_dataset=toy.make_dataset)
        params = _params_at(workdir, 3, _real_config(mixer), build_model)
    return _losses(workdir), _losses(workdir, "train/grad_norm"), params


def _same_runs(mixer, modes, root):
    ref_losses, ref_norms, ref_params = _real_run(mixer, "single", root)
    for mode in modes:
        losses, norms, params = _real_run(mixer, mode, root)
        assert len(losses) == 3
        for ours, ref in zip(losses + norms, ref_losses + ref_norms, strict=True):
            assert abs(ours - ref) <= 1e-5 * abs(ref), (mode, losses, ref_losses)
        worst = assert_close(params, ref_params, 1e-5, f"{mixer} {mode} vs single")
        print(f"{mixer} {mode}: worst relative parameter error after 3 steps {worst:.2e}")
        assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float64"}
        # negative control: the run really trained (the loss moved)
        assert abs(losses[-1] - losses[0]) > 1e-3


@needs8
@pytest.mark.parametrize("mixer", [  # TTT-MLP and the Mamba backbone: `make test-slow` (~20 s each)
    pytest.param(m, marks=pytest.mark.slow) if m in ("ttt_mlp", "ttt_linear_mamba") else m
    for m in REAL])
def test_real_model_same_run_on_the_head_parallel_mesh(tmp_path, mixer):
    """single == mesh data=2 x fsdp=2 x model=2 (and, for TTT-Linear, == pmap)."""
    modes = ["pmap", "data2_fsdp2_model2"] if mixer == "ttt_linear" else ["data2_fsdp2_model2"]
    _same_runs(mixer, modes, str(tmp_path))


@needs8
@pytest.mark.slow  # the remaining placements
@pytest.mark.parametrize("mixer", REAL)
def test_real_model_same_run_under_pmap_and_data_parallel_mesh(tmp_path, mixer):
    _same_runs(mixer, ["data8"] if mixer == "ttt_linear" else ["pmap", "data8"], str(tmp_path))


# ----------------------------------------------------------------------------- the stand-in


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """single, pmap and mesh(data=2, fsdp=4): 4 steps each, checkpoints at steps 3 and 4."""
    base = tmp_path_factory.mktemp("parallel")
    out = {}
    for name, train in [
        ("single", {}),
        ("pmap", dict(parallel="pmap")),
        ("mesh", dict(parallel="mesh", mesh={"data": 2, "fsdp": 4, "model": 1})),
    ]:
        out[name] = (_run(base / name, steps=4, checkpoint_every=3, **train), str(base / name))
    return out


@needs8
@pytest.mark.parametrize("mode", ["pmap", "mesh"])
def test_multi_device_matches_single_device(runs, mode):
    single = _params_at(runs["single"][1], 3)
    summary, workdir = runs[mode]
    lines = lambda w: [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))]
    for ours, ref in zip(lines(workdir), lines(runs["single"][1]), strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert abs(ours[key] - ref[key]) <= 1e-5 * abs(ref[key]), (ours["step"], key)
    worst = assert_close(_params_at(workdir, 3), single, 1e-5, f"{mode} vs single params")
    print(f"{mode}: worst relative parameter error after 3 steps {worst:.2e}")
    # negative control: the run really trained (lr warmed up, loss moved)
    first = lines(workdir)[0]
    assert first["train/lr"] == 0.0 and summary["train"]["train/lr"] > 0
    assert abs(summary["train"]["train/loss"] - first["train/loss"]) > 1e-3


@needs8
def test_mesh_shards_big_matrices_and_replicates_ttt_state(runs):
    state = runs["mesh"][0]["state"]
    specs = {parallel.path_str(p): x.sharding.spec
             for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
    assert "fsdp" in tuple(specs["embed/embedding"]) and tuple(specs["RMSNorm_0/scale"]) == ()
    mu = jax.tree_util.tree_leaves_with_path(state.opt_state)
    assert any("fsdp" in tuple(x.sharding.spec) for _, x in mu)  # moments follow parameters


def test_partition_spec_rules():
    P = jax.sharding.PartitionSpec
    spec = parallel.partition_spec
    assert spec("h/wq/kernel", (2, 64, 128), 4) == P(None, None, "fsdp")
    assert spec("h/wq/kernel", (2, 64, 130), 4) == P(None, "fsdp", None)  # largest divisible
    assert spec("h/b", (64,), 4) == P()  # vectors replicate
    assert spec("h/w", (64, 64), 4, min_size=10_000) == P()  # small matrices replicate
    assert spec("h/seq_modeling_block/ttt_dense_0", (4, 64, 64), 4) == P()  # inner state
    assert spec("h/x/inner_Dense_0/kernel", (4, 64, 64), 4) == P()
    assert spec("h/wq/kernel", (64, 64), 1) == P()
    assert spec("h/wq/kernel", (64, 64), 4, rules=((r"wq", (None, "model")),)) == P(None, "model")
    assert parallel.mesh_shape({"data": -1, "fsdp": 2, "model": 1}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="mesh"):
        parallel.mesh_shape({"data": 3, "fsdp": 2, "model": 1}, 8)


@needs8
def test_restore_from_8_device_mesh_onto_one_device(runs, tmp_path):
    import shutil

    workdir = tmp_path / "resumed"
    shutil.copytree(runs["mesh"][1], workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")
    summary = _run(workdir, steps=4, checkpoint_every=3)  # parallel="single": continues 3 -> 4
    assert summary["step"] == 4
    assert_close(_params_at(str(workdir), 4), _params_at(runs["single"][1], 4), 1e-5,
                 "8-device mesh checkpoint resumed on 1 device")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs8
@pytest.mark.slow  # two fresh processes each import JAX and compile: ~30 s of CPU
def test_two_processes_match_one(runs, tmp_path):
    """2 CPU processes x 4 devices (jax.distributed, mesh data=8) vs the single-process run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=ROOT)
    address = f"127.0.0.1:{_free_port()}"
    train = json.dumps({"parallel": "mesh", "steps": 4, "checkpoint_every": 3})
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "toy.py"), "--workdir", str(tmp_path),
         "--train", train, "--num_processes", "2", "--process_id", str(i), "--coordinator",
         address],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    worst = assert_close(_params_at(str(tmp_path), 3), _params_at(runs["single"][1], 3), 1e-5,
                         "2 processes vs 1")
    print(f"2-process worst relative parameter error {worst:.2e}")
    assert np.isfinite(worst)


# ----------------------------------------------------------------------------- several processes

HOSTS_TRAIN = {"steps": 6, "checkpoint_every": 2, "log_every": 1, "parallel": "mesh",
               "mesh": {"data": 2, "fsdp": 2, "model": 2}, "async_checkpoints": False}


def _two_processes(workdir, cache, delay_s=0.0):
    """The real TTT-Linear LM (float64) in 2 CPU processes x 4 devices (jax.distributed) on one
    mesh data=2 x fsdp=2 x model=2, heads split across the processes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, JAX_ENABLE_X64="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    address = f"127.0.0.1:{_free_port()}"
    model = json.dumps({"dtype": "float64", "mixer_kwargs": {"stats": False}})
    return [subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "toy.py"), "--workdir", str(workdir),
         "--mixer", "ttt_linear", "--model", model, "--train", json.dumps(HOSTS_TRAIN),
         "--data", json.dumps({"delay_s": delay_s}), "--num_processes", "2", "--process_id",
         str(i), "--coordinator", address],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]


def _finish(procs, timeout=300) -> list[str]:
    try:
        return [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            p.kill()


def _summary(out: str) -> dict:
    """The JSON line tests/toy.py prints at the end."""
    return json.loads([line for line in out.splitlines() if line.startswith('{"step"')][-1])


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _real_state_at(workdir, step):
    """The whole TrainState of checkpoint `step` (float64 TTT-Linear), host arrays."""
    import orbax.checkpoint as ocp

    from ttt.models import build_model

    with jax.enable_x64(True):
        config = toy.real_config("ttt_linear", x64=True)
        config.model.mixer_kwargs = {"stats": False}
        meta = toy.make_dataset(config.data, "train", 8, seed=0).meta
        setup = build_setup(resolve_config(config, meta), meta, build_model)
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                              abstract_state(setup))
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        state = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
        ckpt.close()
        return jax.device_get(state)


@needs8
@pytest.mark.slow  # six processes import JAX; two compile: ~2 min of CPU
def test_two_processes_agree_on_preemption_and_match_one_process(tmp_path):
    """2 processes == 1 process (the real model, the head-parallel mesh across both); SIGTERM sent
    to one process only: both save the same step and exit 143, and re-running the command ends
    bitwise equal to the uninterrupted 2-process run."""
    from ttt.models import build_model

    cache, ref, run, one = (tmp_path / d for d in ("cache", "ref", "run", "one"))
    outs = _finish(_two_processes(ref, cache))
    assert all(_summary(o) == {"step": 6, "preempted": False, "process": i}
               for i, o in enumerate(outs)), [o[-2000:] for o in outs]
    with jax.enable_x64(True):  # the same run in one process
        config = toy.real_config("ttt_linear", x64=True, **HOSTS_TRAIN)
        config.model.mixer_kwargs = {"stats": False}
        train_and_evaluate(config, str(one), build_model=build_model,
                           make_dataset=toy.make_dataset)
    ref_state = _real_state_at(str(ref), 6)
    worst = assert_close(ref_state.params, _real_state_at(str(one), 6).params, 1e-5,
                         "2 processes vs 1")
    print(f"2 processes vs 1, real model: worst relative parameter error {worst:.2e}")

    procs = _two_processes(run, cache, delay_s=0.5)
    end = time.time() + 240
    while not os.path.isdir(run / "checkpoints" / "2"):
        assert time.time() < end and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one host is preempted
    outs = _finish(procs)
    summaries = [_summary(o) for o in outs]
    assert [p.returncode for p in procs] == [143, 143], [o[-2000:] for o in outs]
    agreed = summaries[0]["step"]
    assert summaries[1]["step"] == agreed and 2 <= agreed < 6, summaries
    assert all(s["preempted"] for s in summaries)
    assert _checkpoint_steps(run)[-1] == agreed  # one complete checkpoint of that step

    outs = _finish(_two_processes(run, cache))
    assert all(_summary(o)["step"] == 6 for o in outs), [o[-2000:] for o in outs]
    final = _real_state_at(str(run), 6)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise: parameters, Adam moments, step, rng
    assert not np.array_equal(  # negative control: the resumed part really trained
        jax.tree.leaves(final.params)[0], jax.tree.leaves(_real_state_at(str(run),
                                                                         agreed).params)[0])
