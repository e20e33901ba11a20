"""Where every state leaf lives on a device mesh, and what the compiled step communicates.

- The shipped paper configs (125m ... 1.3b, every LM mixer) on 8 CPU devices: the TTT inner state
  is replicated or split over heads, never over an inner feature axis; user rules add to the
  defaults instead of replacing them.
- Head (tensor) parallelism on `model`: the layout of every kind of parameter, and the TTT inner
  loop compiled on a (data, model) mesh runs without any collective.
- The compile-only sharding report (`--compile_only --simulate_devices`): per-device memory,
  collectives, XLA's warnings, `--strict`; the bad-input lines of a mesh that does not fit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lm, vit
from ttt.models import build_model
from ttt.train import parallel
from ttt.train.compile_only import collectives, xla_warnings
from ttt.train.setup import abstract_meta, abstract_state, build_setup, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs8 = pytest.mark.skipif(jax.device_count() < 8,
                            reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
# the TTT / MTTT inner model's initial state and its per-head LayerNorm
INNER_STATE = re.compile(
    r"(^|/)(ttt_dense_\d+|ttt_bias_\d+|ttt_norm/\w+|inner_Dense_\d+/\w+|fw/W\d+)$")


def _placed(config):
    """{path: (shape, PartitionSpec)} of every leaf of the train state as the placement puts it."""
    meta = abstract_meta(config)
    config = resolve_config(config, meta)
    setup = build_setup(config, meta, build_model)
    target = setup.placement.restore_target(abstract_state(setup))
    return {parallel.path_str(p): (a.shape, a.sharding.spec)
            for p, a in jax.tree_util.tree_leaves_with_path(target)}


def _inner_state_problems(leaves: dict) -> list[str]:
    """Inner-state leaves split anywhere but (over model) on their head axis, the one after the
    scanned stack's layer axis."""
    bad = []
    for path, (shape, spec) in leaves.items():
        if not INNER_STATE.search(path):
            continue
        spec = tuple(spec) + (None,) * (len(shape) - len(spec))
        head_ok = spec[1] in (None, "model")
        if not head_ok or any(s is not None for i, s in enumerate(spec) if i != 1):
            bad.append(f"{path} {shape}: {spec}")
    return bad


@needs8
@pytest.mark.parametrize("mixer", lm.MIXERS)
def test_paper_configs_keep_the_inner_state_whole(mixer):
    """Every shipped paper size under its own mesh (fsdp=8), and with model=2: no TTT inner state
    leaf (parameters and Adam moments alike) is split along an inner feature axis."""
    for preset in lm.PRESETS[1:]:
        config = lm.get_config(f"{mixer},{preset},paper")
        assert config.train.partition_rules == ()  # what every config ships: adds nothing
        leaves = _placed(config)
        inner = [p for p in leaves if INNER_STATE.search(p)]
        assert bool(inner) == mixer.startswith(("ttt", "lact")), (mixer, inner[:3])
        assert not _inner_state_problems(leaves), (preset, _inner_state_problems(leaves))
        # FSDP does split the big matrices (the rules are in force, not everything replicated)
        assert "fsdp" in tuple(leaves["params/h/feed_forward/w1/kernel"][1])
        if inner:
            assert all(tuple(leaves[p][1]) == () for p in inner), preset  # model=1: replicated
    config = lm.get_config(f"{mixer},125m,paper")
    config.train.mesh.update(data=1, fsdp=4, model=2)
    leaves = _placed(config)
    assert not _inner_state_problems(leaves)
    for path, (shape, spec) in leaves.items():
        if INNER_STATE.search(path):
            assert tuple(spec)[:2] == (None, "model"), (path, shape, spec)  # split over heads


@needs8
def test_user_rules_add_to_the_defaults():
    """A user rule for one matrix leaves the default rules (inner state, heads) in force; the
    same rule given as the whole table (the old behaviour) would have split W0 over fsdp."""
    config = lm.get_config("ttt_linear,125m,paper")
    config.train.partition_rules = ((r"feed_forward/w2/kernel$", (None, "fsdp", None)),)
    leaves = _placed(config)
    assert tuple(leaves["params/h/feed_forward/w2/kernel"][1]) == (None, "fsdp", None)
    assert tuple(leaves["params/h/seq_modeling_block/ttt_dense_0"][1]) == ()
    # negative control: the fallback alone (no default rule) splits W0 (L, H, d, d) over fsdp
    fallback = parallel.partition_spec("params/h/x/ttt_state", (12, 12, 64, 64), 8)
    assert "fsdp" in tuple(fallback)


def test_head_parallel_layout_of_every_parameter_kind():
    def spec(path, shape, **mesh):  # the PartitionSpec as a tuple without trailing Nones
        out = tuple(parallel.partition_spec(path, shape, {"data": 2, "fsdp": 2, "model": 2,
                                                          **mesh}))
        while out and out[-1] is None:
            out = out[:-1]
        return out

    block = "params/h/seq_modeling_block/"
    assert spec(block + "wq/kernel", (2, 64, 64)) == (None, "fsdp", "model")  # columns = heads
    assert spec(block + "wg/kernel", (2, 64, 64)) == (None, "fsdp", "model")
    assert spec(block + "wo/kernel", (2, 64, 64)) == (None, "model", "fsdp")  # row-parallel
    assert spec(block + "conv_q/kernel", (2, 4, 1, 64)) == (None, None, None, "model")
    assert spec(block + "ttt_dense_0", (2, 4, 16, 64)) == (None, "model")
    assert spec(block + "ttt_bias_1", (2, 4, 16)) == (None, "model")
    assert spec(block + "ttt_norm/scale", (2, 4, 16)) == (None, "model")
    assert spec(block + "learnable_ttt_lr/kernel", (2, 4, 64, 1)) == (None, "model", "fsdp")
    assert spec(block + "learnable_token_idx", (2, 16)) == ()
    assert spec("params/h/feed_forward/w1/kernel", (2, 64, 128)) == (None, "fsdp", "model")
    assert spec("params/h/feed_forward/w2/kernel", (2, 128, 64)) == (None, "model", "fsdp")
    assert spec("params/wte/embedding", (32000, 64)) == ("model", "fsdp")
    assert spec("opt_state/1/0/mu/wte/embedding", (32000, 64)) == ("model", "fsdp")
    vit_block = "params/Transformer/encoderblock/"
    assert spec(vit_block + "seq_modeling_block/psi/kernel", (2, 2, 32, 16)) == (
        None, "model", "fsdp")
    assert spec(vit_block + "seq_modeling_block/h/kernel", (2, 2, 16, 32)) == (
        None, "model", None, "fsdp")
    assert spec(vit_block + "seq_modeling_block/inner_Dense_0/kernel", (2, 2, 16, 64)) == (
        None, "model")
    assert spec(vit_block + "MlpBlock_0/Dense_0/kernel", (2, 32, 64)) == (None, "fsdp", "model")
    # axes of size 1 or not dividing are dropped; fsdp is dropped below the size threshold
    assert spec(block + "wq/kernel", (2, 64, 64), model=1) == (None, "fsdp")
    assert spec("params/wte/embedding", (257, 64)) == (None, "fsdp")
    assert parallel.partition_spec(block + "wq/kernel", (2, 64, 64), {"fsdp": 2, "model": 2},
                                   min_size=10**6) == jax.sharding.PartitionSpec(None, None,
                                                                                 "model")


@needs8
def test_ttt_inner_loop_runs_per_head_without_collectives():
    """The TTT op (forward and backward) on a data=2 x model=4 mesh with the batch and heads
    split: no collective inside the mini-batch loop (W0 and the inner LayerNorm's gradients are
    summed over the batch once, after it)."""
    from ttt.ops import learners, ttt_state

    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    B, H, N, d = 4, 8, 64, 8
    learner = learners.ln_residual(learners.linear(bias=True))
    W0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (H, *a.shape)),
                      learner.init(jax.random.PRNGKey(0), d))
    fixed = {"scale": jnp.ones((H, d)), "bias": jnp.zeros((H, d))}
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, H, N, d)), jnp.float32) for _ in range(3))
    a, c = jnp.full((B, H, N), 0.5), jnp.full((N,), 0.1)

    def loss(W0, fixed, q, k, v):
        z, _ = ttt_state.forward(learner, W0, q, k, v, a, c, mini_batch=8, fixed=fixed)
        return jnp.sum(jnp.sin(z))

    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    args = (jax.tree.map(lambda x: jax.device_put(x, heads), (W0, fixed)) +
            tuple(jax.device_put(x, split) for x in (q, k, v)))
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    found = collectives(step.lower(*args).compile().as_text())
    assert sum(c["in_loops"] for c in found.values()) == 0, found
    assert found["all-reduce"]["count"] >= 1  # the batch sums of W0's and fixed's gradients


# ----------------------------------------------------------------------------- the report


def test_collectives_and_warnings_are_read_from_xla_text():
    hlo = "\n".join([
        "%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {",
        "  %ar = f32[8]{0} all-reduce(%x), channel_id=1, to_apply=%add",
        "  %c = f32[4] call(%x), to_apply=%inner.2",
        "}",
        "%inner.2 (p: f32[4]) -> f32[4] {",
        "  %ag = f32[4,2]{1,0} all-gather(%p), dimensions={1}",
        "}",
        "ENTRY %main.3 (a: f32[8]) -> f32[8] {",
        "  %w = (s32[], f32[8]) while(%t), condition=%cond.4, body=%body.1",
        "  %rs = (bf16[16]{0}, bf16[2,16]{1,0}) all-reduce-start(%a, %b), to_apply=%add",
        "  %done = bf16[16]{0} all-reduce-done(%rs)",
        "  %cp = s32[3]{0} collective-permute(%a), source_target_pairs={{0,1}}",
        "}",
    ])
    found = collectives(hlo)
    assert found["all-reduce"] == {"count": 2, "bytes": 8 * 4 + 2 * 16 * 2, "in_loops": 1}
    assert found["all-gather"] == {"count": 1, "bytes": 32, "in_loops": 1}  # called by the body
    assert found["collective-permute"] == {"count": 1, "bytes": 12, "in_loops": 0}
    assert found["reduce-scatter"]["count"] == found["all-to-all"]["count"] == 0
    log = ("I0000 00:00:1.0  12 cpu_client.cc:1] created\n"
           "W1130 14:48:42.903247   15259 spmd_partitioner.cc:656] [SPMD] Involuntary full "
           "rematerialization. The compiler cannot go from sharding A to B\n"
           "some other line\n")
    assert xla_warnings(log) == ["[SPMD] Involuntary full rematerialization. The compiler "
                                 "cannot go from sharding A to B"]


def _main(args, tmp_path, env_devices=None):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    if env_devices is None:
        env.pop("XLA_FLAGS", None)  # --simulate_devices alone must give the devices
    return subprocess.run([sys.executable, "-m", "ttt.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_compile_only_sharding_report(tmp_path):
    """The command of the README on a fresh process: --simulate_devices 8 gives 8 devices before
    JAX starts; the report and compile_report.json hold memory, collectives and warnings."""
    args = ["--config=experiments/lm.py:ttt_linear,smoke", "--compile_only",
            "--simulate_devices=8", f"--workdir={tmp_path}", "--config.train.parallel=mesh",
            "--config.train.mesh.data=2", "--config.train.mesh.fsdp=2",
            "--config.train.mesh.model=2", "--config.model.mixer_kwargs.stats=False", "--strict"]
    out = _main(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.load(open(tmp_path / "compile_report.json"))
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
    pd = report["per_device"]
    assert 0 < pd["params_bytes"] < 4 * report["params"]  # sharded: less than a full copy
    assert pd["opt_state_bytes"] >= 2 * pd["params_bytes"] * 0.9  # two Adam moments
    assert pd["total_bytes"] >= pd["params_bytes"] + pd["opt_state_bytes"] + pd["temp_bytes"]
    coll = report["collectives"]
    assert coll["all-reduce"]["count"] > 0 and coll["all-gather"]["count"] > 0  # FSDP + heads
    assert coll["all-reduce"]["in_loops"] > 0  # row-parallel reductions in the layer loop
    assert report["warnings"] == []
    for line in ("per-device memory", "collectives in the compiled step", "all-gather",
                 "XLA warnings while compiling: none"):
        assert line in out.stdout, out.stdout


def test_bad_meshes_say_what_to_change(tmp_path):
    """One line, exit 2, before compiling: the axis to change and the --simulate_devices way;
    a model axis that does not divide the heads."""
    out = _main(["--config=experiments/lm.py:ttt_linear,smoke", "--compile_only",
                 "--simulate_devices=8", "--config.train.parallel=mesh",
                 "--config.train.mesh.data=3", "--config.train.mesh.fsdp=2"], tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "config.train.mesh" in lines[0] and "--config.train.mesh.data=4" in lines[0]
    assert "--simulate_devices=6" in lines[0]
    out = _main(["--config=experiments/lm.py:ttt_linear,smoke", "--compile_only",
                 "--simulate_devices=8", "--config.train.parallel=mesh",
                 "--config.train.mesh.data=1", "--config.train.mesh.fsdp=1",
                 "--config.train.mesh.model=8"], tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert "config.train.mesh.model=8" in lines[0] and "4 heads" in lines[0], lines[0]
    assert "Traceback" not in out.stderr


@needs8
def test_vit_head_parallel_step_compiles_without_warnings():
    """The MTTT ViT on data=2, fsdp=2, model=2: heads split, no involuntary rematerialization."""
    from ttt.train.compile_only import compile_report

    config = vit.get_config("mttt_mlp,smoke")
    config.model.update(num_classes=10, image_size=8, channels=1)
    config.train.parallel = "mesh"
    config.train.mesh.update(data=2, fsdp=2, model=2)
    report = compile_report(config)
    assert report["warnings"] == [], report["warnings"]
    assert report["collectives"]["all-reduce"]["count"] > 0


def test_warnings_written_by_xla_are_captured_and_strict_exits_2(tmp_path, monkeypatch, capfd):
    """XLA logs from C++ straight to file descriptor 2: the capture reads that descriptor (and
    passes the text on); --strict turns any warning into exit status 2 with one line, after the
    report is written."""
    from ttt.train import compile_only

    line = ("W1130 14:48:42.903247   15259 spmd_partitioner.cc:656] [SPMD] Involuntary full "
            "rematerialization. The compiler cannot go from sharding A to B")
    with compile_only._captured_stderr() as log:
        os.write(2, (line + "\n").encode())  # below Python, as XLA writes
    assert xla_warnings(log[0]) == [line.split("] ", 1)[1]]
    assert line in capfd.readouterr().err  # passed on, not swallowed

    report = {"params": 10, "devices": 8, "parallel": "mesh", "mesh": {"data": 8}, "flops": 1.0,
              "lower_s": 0.1, "compile_s": 0.2, "memory": {},
              "per_device": {"params_bytes": 40, "opt_state_bytes": 80, "temp_bytes": 100,
                             "total_bytes": 300},
              "collectives": collectives(""), "warnings": [line.split("] ", 1)[1]]}
    monkeypatch.setattr(compile_only, "compile_report", lambda config, lower_only: report)
    args = ["--config=experiments/lm.py:ttt_linear,smoke", f"--workdir={tmp_path}"]
    assert compile_only.main(args) == 0  # without --strict a warning is reported, not fatal
    assert compile_only.main([*args, "--strict"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --strict: XLA printed 1 warning(s)"), err[-1]
    assert json.load(open(tmp_path / "compile_report.json"))["warnings"] == report["warnings"]
