"""Experiment configs, the ablation ladder's equivalence rung, compile-only, and the comparison
report (from synthetic metric files and from a real tiny preset run)."""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
from conftest import assert_close
from flax import traverse_util

from experiments import ablation, compare, grid, lm, mqar, plan, report, specs, vit
from ttt.config import validate
from ttt.models import build_model

FOUR = ("ttt_linear", "ttt_mlp", "linear_attention", "softmax")


def _all_specs() -> list[tuple[object, str]]:
    specs = [(lm, a) for a in lm.sweep("paper") + lm.sweep("cpu")]
    specs += [(lm, f"{m},{p}") for m in lm.MIXERS for p in lm.PRESETS] + [(lm, "smoke")]
    specs += [(vit, a) for a in vit.sweep("paper") + vit.sweep("cpu")]
    specs += [(vit, "mttt_mlp,smoke"), (vit, "softmax_noncausal,Ti"), (vit, "")]
    specs += [(mqar, a) for a in mqar.sweep("paper") + mqar.sweep("cpu")]
    specs += [(mqar, a) for a in mqar.sweep("harness")] + [(mqar, "ttt_mlp,smoke")]
    specs += [(mqar, "softmax,harness,kv=64,n=256,width=256,mix")]
    specs += [(lm, f"{m},long") for m in FOUR] + [(lm, "softmax,long,ctx=1k")]
    specs += [(ablation, a) for s in ("paper", "cpu", "smoke") for a in ablation.sweep(s)]
    return specs


def _filled(config) -> mlc.ConfigDict:
    """The model fields the trainer fills from the dataset, filled from the config's own data."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        m, d = config.model, config.data
        if m.kind == "lm" and m.vocab_size is None:
            m.vocab_size = d.get("vocab_size") or 257
        if m.kind == "vit" and m.num_classes is None:
            m.num_classes, m.image_size, m.channels = 10, 8, 1
    return config


def test_every_config_loads_validates_and_builds():
    specs = _all_specs()
    assert len(specs) > 150
    for module, arg in specs:
        config = module.get_config(arg)
        devices = 8 if config.train.parallel == "mesh" else 1
        validate(config, num_devices=devices, process_count=1)
        build_model(_filled(config).model)  # every field checked, nothing traced
        small = any(t in arg.split(",") for t in ("cpu", "smoke"))
        if small:  # the 2-core CPU scale stays small
            assert config.train.steps <= 600 and config.train.global_batch_size <= 64, arg
        if "paper" in arg.split(","):
            tokens = config.train.global_batch_size * config.data.seq_len
            assert tokens == lm.TOKENS_PER_STEP and config.model.vocab_size == 32000, arg
    with pytest.raises(ValueError, match="rungs"):
        ablation.get_config("no_such_rung")
    with pytest.raises(ValueError, match="MTTT"):
        vit.get_config("softmax_noncausal,T=2")


def test_vision_recipe_matches_the_official_one():
    c = vit.get_config("mttt_mlp,T=4,sgd,pixels")
    assert (c.model.preset, c.model.patch_size, c.model.mixer_kwargs.to_dict()) == (
        "Ti", 0, {"steps": 4, "mode": "sgd"})
    assert c.train.global_batch_size == 1024 and c.train.steps == 90 * 1_281_167 // 1024
    assert (c.optim.lr, c.optim.warmup_steps, c.optim.clip, c.optim.weight_decay) == (
        1e-3, 10_000, 1.0, 1e-4)
    assert c.optim.weight_decay_mask == "matrices" and c.data.randaug is None
    s = vit.get_config("mttt_mlp,imagenet")
    assert (s.model.preset, s.model.patch_size, tuple(s.data.randaug)) == ("S", 16, (2, 15))
    assert s.train.mixup_alpha > 0


def _ladder_model(rung: str):
    config = _filled(ablation.get_config(f"{rung},smoke"))
    with config.unlocked():
        config.model.dtype = "float64"
    return build_model(config.model)


def test_ladder_ttt_equivalence_rung_is_linear_attention(x64):
    """Rung 3 (TTT, W0 = 0, batch GD, η = 1) computes rung 2 (plain linear attention) exactly
    (TTT-LM Theorem 1), with the same parameters; rung 4 (learned W0) does not."""
    ids = jax.random.randint(jax.random.PRNGKey(0), (1, 16), 0, 257)
    plain, equiv, w0 = (_ladder_model(r) for r in ("linear_attn_plain", "ttt_equivalence",
                                                   "learnable_W0"))
    params = plain.init(jax.random.PRNGKey(1), ids)
    # Theorem 1 needs v, k, q of one scale: bigger projections than the init make the test strict.
    params = jax.tree.map(lambda p: p * 20.0 if p.ndim >= 2 else p, params)
    assert jax.tree.structure(params) == jax.tree.structure(equiv.init(jax.random.PRNGKey(1), ids))
    want, _ = jax.jit(plain.apply)(params, ids)
    got, _ = jax.jit(equiv.apply)(params, ids)
    assert float(jnp.std(want)) > 1e-3
    assert_close(got, want, 1e-10, "TTT equivalence vs linear attention logits")
    # Negative control: the same projections plus a learned (non-zero) W0 compute another function.
    flat4 = traverse_util.flatten_dict(w0.init(jax.random.PRNGKey(1), ids))
    shared = traverse_util.flatten_dict(params)
    assert set(shared) < set(flat4)  # rung 4 only adds parameters (ttt_dense_0, ttt_bias_0)
    flat4.update(shared)
    out4, _ = jax.jit(w0.apply)(traverse_util.unflatten_dict(flat4), ids)
    assert not np.allclose(np.asarray(out4), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("mixer", FOUR)
def test_compile_only_lowers_125m_presets_abstractly(mixer):
    from ttt.train.compile_only import compile_report

    config = lm.get_config(f"{mixer},125m,ctx=2k,paper")
    with config.unlocked():  # one CPU device: single placement, a batch that fits the test
        config.train.parallel, config.train.global_batch_size = "single", 2
    out = compile_report(config, lower_only=True)
    # 125M-class: 12 layers of width 768 plus a 32000 x 768 tied embedding.
    assert 0.9e8 < out["params"] < 1.9e8, out
    assert out["flops"] > 2 * 2 * 2048 * 32000 * 768, out  # at least the logits, fwd + bwd


@pytest.mark.slow
@pytest.mark.parametrize("mixer", FOUR)
def test_compile_only_compiles_125m_presets(mixer):
    from ttt.train.compile_only import compile_report, format_report

    config = lm.get_config(f"{mixer},125m,ctx=2k,paper")
    with config.unlocked():
        config.train.parallel, config.train.global_batch_size = "single", 2
    out = compile_report(config)
    assert out["memory"]["argument"] > 4 * out["params"]  # params + two Adam moments at least
    assert "per-device memory" in format_report(out)


# ----------------------------------------------------------------------------- the report


def _fake_run(root, group, name, config, rows, wall=1.0):
    d = os.path.join(root, group, name)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"name": name, "group": group, "spec": "x", "wall_s": wall}, f)
    return d


def _resolved(config):
    config = _filled(config)
    with config.unlocked():
        if config.model.kind == "vit":
            config.model.num_classes, config.model.image_size, config.model.channels = 10, 8, 1
    return config


def test_report_from_metric_files(tmp_path):
    """Every group's table and plot from hand-written metric files, values checked."""
    root = str(tmp_path)
    dirs = []
    for i, m in enumerate(FOUR):
        rows = [{"step": s, "train/loss": 5.0 - s / 100 - i, "train/tokens_per_s": 100.0 * s}
                for s in (25, 50, 75)] + [{"step": 75, "eval/loss": 2.0 + i, "eval/accuracy": 0.5}]
        dirs.append(_fake_run(root, "lm", m, _resolved(lm.get_config(f"{m},cpu")), rows))
    for m in ("linear_attention", "softmax"):
        rows = [{"step": 10, "eval/loss": 1.0, "eval/accuracy": 0.25 if m != "softmax" else 1.0}]
        dirs.append(_fake_run(root, "mqar", m, _resolved(mqar.get_config(f"{m},cpu")), rows))
    for r in ("linear_attn_plain", "ttt_equivalence"):
        rows = [{"step": 5, "train/loss": 3.0}, {"step": 5, "eval/loss": 2.5}]
        dirs.append(_fake_run(root, "ladder", r, _resolved(ablation.get_config(f"{r},cpu")), rows))
    for t in (0, 2):
        rows = [{"step": s, "train/loss": 1.0, "train/images_per_s": 10.0,
                 **{f"train/aux/inner_losses/layer_{layer}/{j}": 1.0 - 0.1 * j * s / 20
                    for layer in range(2) for j in range(t + 1)}} for s in (20, 40)]
        rows.append({"step": 40, "eval/loss": 0.5, "eval/accuracy": 0.8 + 0.05 * t})
        dirs.append(_fake_run(root, "vision", f"T{t}",
                              _resolved(vit.get_config(f"mttt_mlp,T={t},cpu")), rows))
    summaries = [report.summarize(d) for d in dirs]
    # names repeat across groups (an LM and an MQAR run may both be "softmax"): LM and vision here
    by_name = {s["name"]: s for s in summaries if s["group"] in ("lm", "vision")}
    assert by_name["ttt_linear"]["throughput"] == 6250.0  # median of the rates after the first
    # state sizes: TTT-Linear H (d² + d); TTT-MLP H (2 d 4d + 5d); linear attn H d²; softmax 2 N C
    assert by_name["ttt_linear"]["state"] == 4 * (16 * 16 + 16)
    assert by_name["ttt_mlp"]["state"] == 4 * (2 * 16 * 64 + 80)
    assert by_name["linear_attention"]["state"] == 4 * 16 * 16
    assert by_name["softmax"]["state"] == 2 * 128 * 64
    mqar_lin = [s for s in summaries if s["group"] == "mqar" and s["mixer"] != "softmax"][0]
    assert mqar_lin["state"] == 2 * 16 * 16  # width 32, 2 heads of 16
    assert by_name["T2"]["inner"][2][1] == [0.8, 0.6]  # layer mean at W_2 after 20, 40 steps
    text = report.build_report(summaries, root, header="hello")
    assert f"| ttt_mlp | ttt_mlp | {by_name['ttt_mlp']['params']:,} |" in text
    assert f"{3.0 / math.log(2):.4f}" in text  # bits per byte of ttt_mlp's loss 3.0
    assert "| 2 | ttt_equivalence | ttt_linear |" in text and "+0.0000" in text
    assert "| 4,096 | 1.000 |" in text  # softmax MQAR: state 2 N C = 2·64·32, accuracy
    for png in ("lm_loss.png", "ladder_loss.png", "mqar_accuracy_vs_state.png",
                "vision_accuracy_vs_T.png", "vision_inner_loss.png"):
        assert os.path.getsize(os.path.join(root, png)) > 5000, png


def _seeded_run(root, cell, seed, config, eval_loss, by_position=None):
    """A finished lm run of `cell` with one seed: metrics, run.json and optionally the
    evaluation by position."""
    d = os.path.join(root, "lm", cell, f"s{seed}")
    os.makedirs(os.path.join(d, "eval"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 10, "train/loss": eval_loss + 0.1}) + "\n")
        f.write(json.dumps({"step": 10, "eval/loss": eval_loss, "eval/accuracy": 0.5}) + "\n")
    with open(os.path.join(d, "run.json"), "w") as f:
        json.dump({"name": cell, "group": "lm", "key": f"lm/{cell}/s{seed}", "seed": seed,
                   "wall_s": 1.0, "cpu_s": 2.0}, f)
    if by_position is not None:
        with open(os.path.join(d, "eval", "validation.json"), "w") as f:
            json.dump({"loss": float(np.mean(by_position)),
                       "loss_by_position": [float(x) for x in by_position]}, f)
    return d


def test_report_means_spreads_findings_and_positions(tmp_path):
    """Cells aggregate their seeds (mean ± sd); a difference is a finding only beyond the
    spread; the loss-by-position findings tell a curve that keeps falling from one that
    flattens (the negative control); results.json has one row per run and metric."""
    root = str(tmp_path)
    config = _resolved(lm.get_config("softmax,cpu"))
    with config.unlocked():
        config.data.seq_len = 256
    pos = np.arange(1, 257)
    rng = np.random.default_rng(0)
    losses = {"falling": (2.00, 2.01, 2.02), "worse": (2.50, 2.51, 2.49),
              "close": (2.015, 2.06, 1.98)}
    wiggle = 0.05 * (-1.0) ** pos  # averages to zero over every octave but the last
    dirs = []
    for cell, values in losses.items():
        for seed, value in enumerate(values):
            if cell == "falling":  # keeps improving with log position, to the end
                curve = 3.0 - 0.2 * np.log2(pos) + 0.002 * rng.standard_normal(256)
            elif cell == "worse":  # flat from position 16 on: seed offsets and a wiggle only
                curve = 3.0 - 0.2 * np.log2(np.minimum(pos, 16)) + 0.01 * seed + wiggle
            else:
                curve = None
            dirs.append(_seeded_run(root, cell, seed, config, value, curve))
    summaries = [report.summarize(d) for d in dirs]
    cellmap = report.cells(summaries)
    assert [len(c) for c in cellmap.values()] == [3, 3, 3]
    mean, sd, n = report.stats(r["eval_loss"] for r in cellmap["falling"])
    assert (round(mean, 6), round(sd, 6), n) == (2.01, 0.01, 3)
    a, b, c = (report.stats(r["eval_loss"] for r in cellmap[k]) for k in losses)
    assert report.verdict(a, b) == "finding"
    assert report.verdict(a, c) == "within spread"  # 0.005 apart, spreads 0.01 + 0.04
    assert report.verdict(a, (2.5, math.nan, 1)) == "n/a: seeds"
    assert report.fmt_stats(a) == "2.0100 ± 0.0100" and report.fmt_stats((2.5, math.nan, 1)) \
        == "2.5000"
    text = report.build_report(summaries, root)
    assert "| falling | softmax |" in text and "| 2.0100 ± 0.0100 |" in text
    assert "falling vs close: Δ -0.0083 (within spread)" in text
    assert "close vs worse: Δ -0.4817 (finding)" in text
    assert "- falling: still improving at the end of the context" in text
    assert "- worse: improves up to the octave starting at 16, flat beyond" in text
    assert "positions 128–256, lowest loss first: falling vs worse:" in text
    assert os.path.getsize(os.path.join(root, "lm_loss_by_position.png")) > 5000
    rows = json.load(open(os.path.join(root, "results.json")))
    per_run = {(r["cell"], r["seed"]) for r in rows}
    assert len(per_run) == 9
    assert {r["metric"] for r in rows} >= {"eval_loss", "eval_accuracy", "state_floats",
                                          "loss_positions_128-256"}
    row = next(r for r in rows if r["cell"] == "worse" and r["seed"] == 1 and
               r["metric"] == "eval_loss")
    assert row["value"] == 2.51 and row["mixer"] == "softmax" and row["setting"] == "ctx=256"


def test_report_only_includes_every_run_given(tmp_path, capsys):
    """`compare --runs DIR ...` reports finished runs of other comparisons (their run.json has a
    key of a cell this invocation does not plan): every one is in the table."""
    root = str(tmp_path / "a")
    config = _resolved(lm.get_config("softmax,cpu"))
    dirs = [_seeded_run(root, "softmax", seed, config, 2.0 + 0.1 * seed) for seed in (0, 1)]
    out = str(tmp_path / "report")
    assert compare.main(["--workdir", out, "--runs", *dirs]) == 0
    text = open(os.path.join(out, "report.md")).read()
    assert "2.0500 ± 0.0707" in text and "| 2 |" in text, text


def test_report_leaves_diverged_lm_seeds_out_of_loss_and_accuracy(tmp_path):
    """A diverged LM seed counts in the seeds column, not in the loss or accuracy means; a cell
    whose every seed diverged shows no accuracy (not 0)."""
    root = str(tmp_path)
    config = _resolved(lm.get_config("softmax,cpu"))
    runs = []
    for cell, diverged in (("half", (False, True)), ("gone", (True, True))):
        for seed, bad in enumerate(diverged):
            d = _seeded_run(root, cell, seed, config, 2.0 + seed)
            if bad:
                info = json.load(open(os.path.join(d, "run.json")))
                with open(os.path.join(d, "run.json"), "w") as f:
                    json.dump({**info, "diverged": "loss is nan"}, f)
            runs.append(report.summarize(d))
    rows = {line.split("|")[1].strip(): [x.strip() for x in line.split("|")[1:-1]]
            for line in report.lm_table(runs).splitlines()[2:]}
    assert rows["half"][4] == "2.0000" and rows["half"][6] == "0.500", rows
    assert rows["half"][7] == "2 (1 diverged)"
    assert rows["gone"][4] == "—" and rows["gone"][6] == "—" and rows["gone"][7] == "2 (2 diverged)"


def test_best_lr_ranks_diverged_runs_last(tmp_path):
    cell = grid.Cell("mqar", "m", "experiments/mqar.py:softmax,smoke", seeds=(0, 1),
                     lrs=(1e-3, 1e-2, 3e-2))
    root = str(tmp_path)
    assert plan.best_lr(cell, root) is None  # nothing finished: the other seeds wait
    assert [r.key for r in plan.expand(cell, root)[0]] == [
        "mqar/m/lr0.001_s0", "mqar/m/lr0.01_s0", "mqar/m/lr0.03_s0"]
    for lr, acc, diverged in ((1e-3, 0.4, False), (1e-2, 0.9, False), (3e-2, 0.0, True)):
        d = os.path.join(root, grid.Run(cell, 0, lr).key)
        os.makedirs(d)
        with open(os.path.join(d, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 5, "eval/loss": 1.0, "eval/accuracy": acc}) + "\n")
        with open(os.path.join(d, "run.json"), "w") as f:
            json.dump({"diverged": "loss is nan"} if diverged else {}, f)
    assert plan.best_lr(cell, root) == 1e-2
    runs, complete = plan.expand(cell, root)
    assert complete and runs[-1].key == "mqar/m/lr0.01_s1"
    assert [r.key for r in plan.selected(cell, root)] == ["mqar/m/lr0.01_s0",
                                                           "mqar/m/lr0.01_s1"]


@pytest.mark.slow  # ~90 s; the default suite runs compare in test_compare_grid (3 steps)
def test_compare_runs_the_tiny_preset_end_to_end(tmp_path, capsys):
    """Seeds, the lr sweep (the other seeds at the best rate), a run started from the
    Transformer of the same seed, the loss by position, results.json; a rerun trains nothing."""
    workdir = str(tmp_path / "cmp")
    assert compare.main(["--preset", "tiny", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    text = open(os.path.join(workdir, "report.md")).read()
    assert text.strip() in out.strip()
    keys = []
    for cell in grid.PRESETS["tiny"]:
        for run in plan.expand(cell, workdir)[0]:
            info = json.load(open(os.path.join(workdir, run.key, "run.json")))
            assert info["step"] > 0 and info["seed"] == run.seed and info["cpu_s"] > 0
            keys.append(run.key)
    # the sweep: both rates on seed 0, then seed 1 at the chosen one only
    sweep = next(c for c in grid.PRESETS["tiny"] if c.lrs)
    best = plan.best_lr(sweep, workdir)
    assert best in sweep.lrs
    assert sorted(k for k in keys if k.startswith("mqar/")) == sorted(
        [f"mqar/{sweep.name}/lr{lr:g}_s0" for lr in sweep.lrs]
        + [f"mqar/{sweep.name}/lr{best:g}_s1"])
    # the init run started from the Transformer of its seed
    config = json.load(open(os.path.join(workdir, "init/ttt_linear_from_softmax/s0/config.json")))
    assert config["init"]["transformer_workdir"] == os.path.join(workdir, "lm/softmax/s0")
    by_pos = json.load(open(os.path.join(workdir, "lm/softmax/s1/eval/validation.json")))
    assert len(by_pos["loss_by_position"]) == 64
    assert "| softmax | 16 | 2 |" in text  # MQAR row
    assert "| ttt_linear | ttt_linear |" in text  # LM row
    assert "--preset tiny" in text  # the command as given, not the test runner's argv
    assert "## Language model" in text and "## MQAR" in text and "## TTT from" in text
    assert "Learning-rate sweep" in text and "Validation loss by token position" in text
    assert "| ttt_linear | from scratch |" in text  # the init table pairs it with the lm cell
    for png in ("lm_loss.png", "lm_loss_by_position.png", "mqar_accuracy_vs_state.png",
                "init_loss.png"):
        assert os.path.exists(os.path.join(workdir, png)), png
    rows = json.load(open(os.path.join(workdir, "results.json")))
    mqar_acc = [r for r in rows if r["group"] == "mqar" and r["metric"] == "eval_accuracy"]
    assert len(mqar_acc) == 3 and sum(r["selected"] for r in mqar_acc) == 2
    assert {r["seed"] for r in rows if r["cell"] == "softmax" and r["group"] == "lm"} == {0, 1}
    assert any(r["metric"].startswith("loss_positions_") for r in rows)
    # finished runs are reused: a second call trains nothing and rebuilds the same tables
    mtimes = {k: os.path.getmtime(os.path.join(workdir, k, "run.json")) for k in keys}
    assert compare.main(["--preset", "tiny", "--workdir", workdir]) == 0
    again = open(os.path.join(workdir, "report.md")).read()
    assert again.split("## ", 1)[1] == text.split("## ", 1)[1]
    assert mtimes == {k: os.path.getmtime(os.path.join(workdir, k, "run.json")) for k in keys}
    # other settings than the finished runs': one line, exit 2, nothing trained or deleted
    capsys.readouterr()
    assert compare.main(["--preset", "tiny", "--workdir", workdir, "--set",
                         "optim.clip=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.clip: 1.0 there, 0.5 here" in err, err
    assert f"{len(keys)} run(s) in {workdir}" in err and "--force" in err
    assert mtimes == {k: os.path.getmtime(os.path.join(workdir, k, "run.json")) for k in keys}


def test_comparison_workers_load_a_cells_later_seeds_from_the_compilation_cache(
        tmp_path, monkeypatch):
    """A worker of the comparison's pool (`scheduler._pin`) keeps JAX's compiled programs in the
    workdir's cache (`scheduler.compilation_cache`): the real tiny LM at seed 0 writes its train
    and eval steps there; at seed 1 the worker compiles no new step (it loads them); at another
    learning rate it compiles a new train step (negative control: the rate is a constant)."""
    import concurrent.futures
    import multiprocessing

    from experiments import scheduler

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)  # the workdir's, not a user's
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny steps too
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", root)
    workdir = str(tmp_path / "cmp")
    cache = scheduler.compilation_cache(workdir)
    assert cache.startswith(os.path.join(workdir, ".xla_cache", ""))
    overrides = ["model.num_layers=1", "model.width=16", "model.num_heads=2", "model.ffn_dim=32",
                 "data.seq_len=16", "train.global_batch_size=4", "train.steps=2",
                 "train.eval_every=2", "train.progress=False"]
    spec = "experiments/lm.py:ttt_linear,smoke"

    def steps_cached() -> set[str]:
        return {f for f in os.listdir(cache) if f.startswith(("jit_train_step", "jit_eval_step"))}

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=scheduler._pin,
                                                initargs=(ctx.Value("i", 0), cache)) as pool:
        def train(seed: int, extra=()) -> dict:
            return pool.submit(scheduler.run_one, f"lm/t/s{seed}", "lm", "t", spec,
                               str(tmp_path / "cmp" / f"s{seed}_{len(extra)}"),
                               [*overrides, f"train.seed={seed}", *extra]).result(timeout=600)

        assert train(0)["step"] == 2
        first = steps_cached()
        assert {f.split("-")[0] for f in first} == {"jit_train_step", "jit_eval_step"}, first
        assert train(1)["step"] == 2
        assert steps_cached() == first  # seed 1: nothing compiled anew
        assert train(1, ["optim.lr=1e-2"])["step"] == 2
        assert len(steps_cached() - first) == 1  # the new rate: its own train step


def test_overrides_and_spec_loading():
    config = specs.load_config("experiments/lm.py:softmax,smoke",
                               ["train.steps=7", "model.mixer_kwargs={'cache_size': 64}",
                                "data.tokenizer=byte"])
    assert config.train.steps == 7 and config.model.mixer_kwargs.cache_size == 64
    assert config.data.tokenizer == "byte"
    with pytest.raises(ValueError, match="no such file 'experiments/nope.py'"):
        specs.load_config("experiments/nope.py:x")
    # the fields the trainer or the preset fill are typed placeholders: overridable like the rest
    config = specs.load_config("experiments/vit.py:smoke", ["model.num_layers=1",
                                                            "model.width=16"])
    assert (config.model.num_layers, config.model.width, config.model.mlp_dim) == (1, 16, None)
    with pytest.raises(ValueError, match="train.steps=abc: expected an integer"):  # as ttt.main
        specs.load_config("experiments/lm.py:smoke", ["train.steps=abc"])
    with pytest.raises(ValueError, match="config.train has no key 'nope'"):  # as ttt.main
        specs.load_config("experiments/lm.py:smoke", ["train.nope=1"])


@pytest.mark.parametrize("module,arg,needle", [
    (lm, "smok", "unknown token 'smok'; known causal mixers: ttt_linear"),
    (lm, "ttt_linear,125M", "unknown token '125M'"),
    (lm, "mttt_mlp", "unknown token 'mttt_mlp'"),  # non-causal: not an LM mixer
    (lm, "ttt_linear,softmax", "mixer given twice"),
    (lm, "ctx=big", "'ctx=big'"),
    (mqar, "ttt_linear,depth=2", "unknown key 'depth'"),
    (mqar, "n=0", "expected a positive integer"),
    (vit, "mttt_mlp,T=2,gd,sgd", "mode given twice"),
    (vit, "linear_attention,norm=softmax", "expected one of adaptive, constant"),
    (ablation, "lnres", "known rungs: linear_attn"),
])
def test_argument_typos_fail_in_one_line(module, arg, needle):
    with pytest.raises(ValueError) as err:
        module.get_config(arg)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_compare_bad_spec_or_override_exits_2_in_one_line(tmp_path, capsys):
    for argv in (["--configs", "experiments/lm.py:ttt_linear,smok"],
                 ["--preset", "tiny", "--set", "train.stepz=3"]):
        assert compare.main([*argv, "--workdir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
    assert not os.path.exists(tmp_path / "w")  # nothing trained


def test_compare_selects_groups_and_takes_a_user_corpus(tmp_path):
    """--only keeps a preset's groups (an init cell brings its Transformer along), --seeds
    replaces the seeds, and --set points the long-context LMs at the user's text files."""
    args = argparse.Namespace(preset="compare", only="init", seeds="3,4", configs=None,
                              overrides=["data.name=text_files",
                                         f"data.paths=['{tmp_path}']"])
    cells = compare._cells(args)
    assert [(c.group, c.name) for c in cells] == [("init", "ttt_linear_from_softmax"),
                                                  ("lm", "softmax")]
    assert all(c.seeds == (3, 4) for c in cells)
    run = grid.Run(cells[0], 3)
    overrides = grid.run_overrides(run, "W", args.overrides)
    config = specs.load_config(cells[0].spec, [o for o in overrides if "init." not in o])
    assert config.data.name == "text_files" and list(config.data.paths) == [str(tmp_path)]
    assert config.data.seq_len == 2048 and config.train.seed == 3
    assert f"init.transformer_workdir={os.path.join('W', 'lm', 'softmax', 's3')}" in overrides
