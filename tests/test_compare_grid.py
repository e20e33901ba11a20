"""The comparison grid of the whole family (experiments/grid.py) and the report rules that keep
it from over-reading (experiments/report.py, report_plots.py): the new cells and their
overrides, every preset's configs loading and validating, the hybrid-aware state size, the
3-seed findings rule, the eval-point curve fallback, and a real 3-step comparison with a hybrid
cell, then its report alone (`--report-only`) once a cell is added."""

from __future__ import annotations

import json
import math
import os

import pytest

from experiments import compare, grid, mqar, report, report_plots
from experiments.specs import load_config
from ttt.config import validate
from ttt.layers import state_size as registry_state_size

NEW = ("deltanet", "gated_deltanet", "mamba2", "titans", "ttt_linear_gate", grid.HYBRID_TTT_SWA,
       grid.HYBRID_GDN_SOFTMAX)


def _by_name(preset: str) -> dict[tuple[str, str], grid.Cell]:
    return {(c.group, c.name): c for c in grid.PRESETS[preset]}


def test_compare_has_every_new_cell_with_its_overrides():
    """MQAR at 8 and 16 pairs (the sweep, 3 seeds) and the 2k LMs (3 seeds, by position) for
    each new mixer; the gate and the hybrids carry their overrides, windows per task."""
    cells = _by_name("compare")
    for m in NEW:
        for kv in grid.MQAR_PAIRS:
            c = cells[("mqar", f"{m}_kv{kv}")]
            assert c.seeds == grid.SEEDS and c.lrs == grid.MQAR_LRS, c
            assert f"harness,kv={kv}" in c.spec
        lm = cells[("lm", m)]
        assert lm.seeds == grid.SEEDS and lm.by_position and "ctx=2k" in lm.spec
    gate = cells[("mqar", "ttt_linear_gate_kv8")]
    assert gate.spec.startswith("experiments/mqar.py:ttt_linear,") and \
        "model.mixer_kwargs.gate=True" in gate.overrides
    swa = cells[("mqar", f"{grid.HYBRID_TTT_SWA}_kv16")]
    assert {"model.num_layers=4", "model.pattern=ttt_linear,ttt_linear,ttt_linear,swa",
            "model.mixer_kwargs.swa.window=16"} <= set(swa.overrides)
    assert "model.mixer_kwargs.swa.window=256" in cells[("lm", grid.HYBRID_TTT_SWA)].overrides
    gdn = cells[("lm", grid.HYBRID_GDN_SOFTMAX)]
    assert gdn.spec.startswith("experiments/lm.py:gated_deltanet,") and \
        "model.pattern=gated_deltanet,gated_deltanet,gated_deltanet,softmax" in gdn.overrides
    # the demo gains exactly one hybrid row and one Gated DeltaNet row, both LMs
    demo = _by_name("demo")
    new_in_demo = [k for k in demo if k[1].split("_kv")[0] in NEW]
    assert sorted(new_in_demo) == [("lm", "gated_deltanet"), ("lm", grid.HYBRID_TTT_SWA)]
    # Titans trains in the comparison, not in the demo
    assert ("mqar", "titans_kv16") in cells and ("lm", "titans") in cells
    assert not any("titans" in c.spec for c in grid.PRESETS["demo"])
    assert "model.mixer_kwargs.swa.window=128" in demo[("lm", grid.HYBRID_TTT_SWA)].overrides


def test_frontier_preset_widths_seeds_and_budget():
    """256 tokens, 64 pairs, widths 64 / 128 / 256, one seed per point and 3 at the middle
    width, trained on the mixture of pair counts; the budget is a parameter."""
    cells = grid.PRESETS["frontier"]
    assert {c.spec.split(":")[1].split(",", 1)[0] for c in cells} == {
        grid.VARIANTS.get(m, (m,))[0] for m in grid.MQAR_MIXERS}
    for c in cells:
        assert "n=256" in c.spec and "kv=64" in c.spec, c.spec
        w = int(c.spec.rsplit("width=", 1)[1].split(",")[0])
        config = load_config(c.spec, c.overrides)
        assert config.data.train_num_kv_pairs == "4,8,16,32,64" and config.data.num_kv_pairs == 64
        assert w in (64, 128, 256) and c.seeds == (grid.SEEDS if w == 128 else (0,))
        assert f"train.steps={grid.FRONTIER_STEPS}" in c.overrides
        mixer = c.name.split("_kv")[0]
        rate = grid.FRONTIER_LR.get(w, grid.MQAR_BEST_LR.get(mixer, 3e-3))
        assert config.optim.lr == rate, (c.name, config.optim.lr)
    assert {load_config(c.spec, c.overrides).optim.lr for c in cells if "_w256" in c.name} == {
        1e-3}  # where softmax attention left the plateau at width 256
    assert len(cells) == 3 * len(grid.MQAR_MIXERS)
    assert grid.HARNESS_STEPS == mqar.HARNESS_STEPS
    short = grid.frontier_cells(steps=80)
    assert all({"train.steps=80", "train.eval_every=10"} <= set(c.overrides) for c in short)
    assert grid.estimate_s(cells) > grid.estimate_s(grid.PRESETS["compare"])  # not in compare


def test_every_preset_cell_loads_and_validates():
    """Every distinct (spec, overrides) of every preset loads as `python -m ttt.main` would
    load it and passes ttt.config.validate; the hybrids' patterns and windows arrive."""
    seen = {}
    for cells in grid.PRESETS.values():
        for c in cells:
            if (c.spec, c.overrides) not in seen:
                config = load_config(c.spec, c.overrides)
                validate(config)
                seen[(c.spec, c.overrides)] = (c, config)
    hybrids = [(c, cfg) for c, cfg in seen.values() if c.name.startswith(grid.HYBRID_TTT_SWA)]
    assert hybrids
    for c, cfg in hybrids:
        assert cfg.model.num_layers == 4 and cfg.model.pattern.startswith("ttt_linear,")
        window = cfg.model.mixer_kwargs.swa.window
        assert window == (cfg.data.seq_len // 4 if c.group == "mqar" else cfg.data.seq_len // 8)
    gate = next(cfg for c, cfg in seen.values() if c.name == "ttt_linear_gate_kv8")
    assert gate.model.mixer_kwargs.gate is True


def test_hybrid_state_size_is_the_mean_over_layers():
    """TTT-Linear x3 + sliding window (16) at MQAR's width 64, 2 heads of 32: (3 H (d² + d) +
    2 W C) / 4 floats per layer; Gated DeltaNet x3 + softmax likewise. Negative controls: the
    config's single mixer, and the sum over the pattern, both differ."""
    cells = _by_name("compare")
    c = cells[("mqar", f"{grid.HYBRID_TTT_SWA}_kv8")]
    config = load_config(c.spec, c.overrides).to_dict()
    ttt, swa = 2 * (32 * 32 + 32), 2 * 16 * 64
    assert report.state_size(config) == (3 * ttt + swa) / 4 == 2096
    assert report.variant(config) == "ttt_linear×3+swa"
    plain = load_config(c.spec, ()).to_dict()
    assert report.state_size(plain) == ttt != 2096  # the single-mixer reading it replaces
    assert 3 * ttt + swa != report.state_size(config)  # not the sum
    c = cells[("mqar", f"{grid.HYBRID_GDN_SOFTMAX}_kv8")]
    config = load_config(c.spec, c.overrides).to_dict()
    gdn = registry_state_size("gated_deltanet", 64, 2, 64)
    assert report.state_size(config) == round((3 * gdn + 2 * 64 * 64) / 4)
    assert report.variant(config) == "gated_deltanet×3+softmax"
    gate = cells[("mqar", "ttt_linear_gate_kv8")]
    assert report.variant(load_config(gate.spec, gate.overrides).to_dict()) == "ttt_linear+gate"


def test_findings_need_three_seeds_a_side():
    """Two seeds far apart: n/a; three seeds beyond the spread: a finding; three within: not."""
    two_a, two_b = report.stats([1.0, 1.01]), report.stats([2.0, 2.01])
    assert report.verdict(two_a, two_b) == report.NA_SEEDS
    a, far, near = (report.stats(v) for v in ([1.0, 1.01, 1.02], [2.0, 2.01, 2.02],
                                              [1.01, 1.05, 0.97]))
    assert report.verdict(a, far) == "finding"
    assert report.verdict(a, near) == "within spread"
    assert report.verdict(a, two_b) == report.NA_SEEDS  # one side short is enough
    assert report.paired_verdict([0.5, 0.5]) == report.NA_SEEDS
    assert report.paired_verdict([0.5, 0.51, 0.49]) == "finding"
    assert report.paired_verdict([0.5, -0.4, 0.1]) == "within spread"


def test_curves_fall_back_to_eval_points(tmp_path):
    """A run with < 2 train points is drawn from its eval points (and says so); with neither,
    it says too few points; a wrapped title's lines fit."""
    cut = {"train_curve": ([25], [3.0]), "eval_loss_curve": ([25, 50, 75], [3.0, 2.5, 2.2])}
    full = {"train_curve": ([1, 2, 3], [3.0, 2.9, 2.8]), "eval_loss_curve": ([3], [2.7])}
    none = {"train_curve": ([3], [2.9]), "eval_loss_curve": ([3], [2.7])}
    assert report_plots.loss_curve(cut) == (cut["eval_loss_curve"], "eval")
    assert report_plots.loss_curve(full) == (full["train_curve"], "train")
    assert report_plots.loss_curve(none)[1] == "too few points"
    path = str(tmp_path / "c.png")
    report_plots.plot_loss_curves({"cut": [cut], "full": [full], "none": [none]}, path,
                                  report.TITLES["lm"])
    assert os.path.getsize(path) > 5000
    lines = report_plots.wrap(report.TITLES["lm"]).split("\n")
    assert len(lines) > 1 and max(map(len, lines)) <= 55


def test_three_step_compare_with_a_hybrid_is_sane(tmp_path, monkeypatch, capsys):
    """A real comparison of 3 steps (`--set train.steps=3`, logged every 25): a hybrid MQAR cell
    beside softmax, one seed each; the report shows the hybrid's variant and its mean state,
    calls nothing a finding, and writes every plot. Then `--report-only` with one more cell."""
    mixer, overrides = grid.variant(grid.HYBRID_TTT_SWA, 16, 4)
    spec = "experiments/mqar.py:{},n=16,kv=2,width=16,smoke"
    cells = [grid.Cell("mqar", "softmax_kv2", spec.format("softmax")),
             grid.Cell("mqar", "hybrid_kv2", spec.format(mixer), overrides)]
    monkeypatch.setitem(compare.PRESETS, "tiny", cells)
    workdir = str(tmp_path / "cmp")
    assert compare.main(["--preset", "tiny", "--workdir", workdir, "--jobs", "1", "--set",
                         "train.steps=3", "--set", "train.log_every=25"]) == 0
    text = open(os.path.join(workdir, "report.md")).read()
    config = json.load(open(os.path.join(workdir, "mqar/hybrid_kv2/s0/config.json")))
    state = report.state_size(config)  # width 16, 2 heads of 8, window 4: (3·144 + 128) / 4
    assert state == (3 * 2 * (8 * 8 + 8) + 2 * 4 * 16) / 4 == 140
    assert f"| ttt_linear×3+swa | 16 | 2 | 16 | {state} |" in text, text
    assert "(finding)" not in text and "harness NOT validated" in text
    summary = report.summarize(os.path.join(workdir, "mqar/hybrid_kv2/s0"))
    assert summary["steps"] == 3 and len(summary["train_curve"][0]) < 2
    assert not math.isnan(summary["eval_accuracy"])
    for png in ("mqar_accuracy_vs_state.png", "mqar_curves.png"):
        assert os.path.getsize(os.path.join(workdir, png)) > 5000, png
    # a cell added since, not trained: --report-only reports the finished runs, lists it as
    # unfinished and trains nothing
    cells.append(grid.Cell("mqar", "linear_kv2", spec.format("linear_attention"), seeds=(0, 1)))
    capsys.readouterr()
    assert compare.main(["--preset", "tiny", "--workdir", workdir, "--report-only", "--set",
                         "train.steps=3", "--set", "train.log_every=25"]) == 0
    text = open(os.path.join(workdir, "report.md")).read()
    assert "Runs finished: 2 of 4 planned; unfinished cells (runs done of planned): " \
        "mqar/linear_kv2 (0 of 2)." in text, text
    assert f"| ttt_linear×3+swa | 16 | 2 | 16 | {state} |" in text
    assert not os.path.exists(os.path.join(workdir, "mqar/linear_kv2"))
    with pytest.raises(SystemExit) as stop:  # argparse's error: one line, exit 2
        compare.main(["--preset", "tiny", "--workdir", workdir, "--report-only", "--force"])
    assert stop.value.code == 2 and "--report-only trains nothing" in capsys.readouterr().err
    assert os.path.exists(os.path.join(workdir, "mqar/hybrid_kv2/s0/run.json"))



def test_only_picks_groups_and_cell_patterns(capsys):
    """`--only` takes groups and GROUP/NAME patterns (a rank-4 slice of `compare`, with the
    Transformer an init cell needs); a pattern that matches nothing is one line, exit 2."""
    args = lambda only: compare.argparse.Namespace(preset="compare", only=only, seeds="0",
                                                    overrides=[], configs=None)
    cells = compare._cells(args("mqar/deltanet_*,mqar/hybrid_*_kv8"))
    assert [c.name for c in cells] == ["deltanet_kv8", "hybrid_ttt_swa_kv8",
                                       "hybrid_gdn_softmax_kv8", "deltanet_kv16"]
    assert all(c.seeds == (0,) for c in cells)
    init = compare._cells(args("init"))
    assert [f"{c.group}/{c.name}" for c in init] == ["init/ttt_linear_from_softmax", "lm/softmax"]
    assert compare.main(["--preset", "compare", "--only", "mqar/nothing_*", "--workdir",
                         "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --only mqar/nothing_*: no cell of preset 'compare' matches")
    assert "\n" not in err
