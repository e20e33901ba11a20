"""One device, pmap over 8 and a (data, fsdp) mesh give the same training run; a checkpoint
written on the 8-device mesh restores onto one device; two `jax.distributed` CPU processes agree
with one process. Stand-in model (tests/toy.py), float32, 3 steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import toy
from conftest import assert_close

from ttt.train import Checkpointer, parallel
from ttt.train.train import abstract_state, build_setup, resolve_config, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs8 = pytest.mark.skipif(jax.device_count() < 8,
                            reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _run(workdir, **train):
    config = toy.toy_config("lm", **train)
    return train_and_evaluate(config, str(workdir), build_model=toy.build_model,
                              make_dataset=toy.make_dataset)


def _params_at(workdir, step):
    """Parameters of checkpoint `step` in `workdir`, restored onto one device as host arrays."""
    import orbax.checkpoint as ocp

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    assert step in ckpt.all_steps(), ckpt.all_steps()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config = toy.toy_config("lm")
    meta = toy.make_dataset(config.data, "train", 8, seed=0).meta
    setup = build_setup(resolve_config(config, meta), meta, toy.build_model)
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          abstract_state(setup))
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    ckpt.close()
    return jax.device_get(state.params)


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
