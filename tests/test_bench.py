"""Smoke test of the benchmark machinery (experiments/bench.py) on a tiny shape: structure only,
no timing assertions (timings on a shared CPU say nothing)."""

from __future__ import annotations

import json

import pytest

from experiments import bench, bench_ops, bench_report
from ttt.layers import forward_flops


def test_flop_counts_follow_the_math():
    N, C, H = 256, 64, 4
    d = C // H
    proj = 4 * 2 * N * C * C
    # linear attention, chunk 64: 4 N c d + 4 N d² per head on top of the projections
    la = forward_flops("linear_attention", N, C, H, chunk=64)
    assert la == proj + H * (4 * N * 64 * d + 4 * N * d * d)
    # softmax: full masked N×N scores, 4 N² d per head
    sm = forward_flops("softmax", N, C, H)
    assert sm == proj + H * 4 * N * N * d
    # TTT-Linear dual: per head and mini-batch 6 b d² + 6 b² d, plus the η gate 2 N C H
    b = 16
    tl = forward_flops("ttt_linear", N, C, H, form="dual", stats=False)
    assert tl == proj + 2 * N * C * H + H * (N // b) * (6 * b * d * d + 6 * b * b * d)
    # negative controls: the primal form materialises b states per mini-batch; MLP costs more
    primal = forward_flops("ttt_linear", N, C, H, form="primal", stats=False)
    mlp = forward_flops("ttt_mlp", N, C, H, form="dual", stats=False)
    assert primal > tl and mlp > tl
    with pytest.raises(ValueError, match="known mixers"):
        forward_flops("rnn", N, C, H)


@pytest.mark.slow  # ~25 s; the tiny_bench_json fixture runs the bench in the default suite
def test_bench_tiny_run_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    argv = ["--out", str(out), "--width", "32", "--heads", "2", "--ns", "32", "--runs", "1",
            "--mixers", "ttt_linear,ttt_linear_pallas", "--decode-contexts", "32",
            "--skip", "remat,lm_compile", "--batch", "2", "--batch-n", "32",
            "--small-spec", "experiments/mqar.py:softmax,smoke", "--small-steps", "2"]
    result = bench.main(argv)

    data = json.loads((out / "bench.json").read_text())
    assert data["baseline"] == "linattn_chunked" and data["shape"]["width"] == 32
    assert data["ceiling_gflops"] > 0
    rows = {(r["mixer"], r["N"]): r for r in data["layers"]}
    # the baseline added itself; the Pallas kernel is timed on a GPU only
    assert set(rows) == {("linattn_chunked", 32), ("ttt_linear", 32), ("ttt_linear_pallas", 32)}
    assert rows.pop(("ttt_linear_pallas", 32))["skipped"].startswith("Pallas kernel: GPU only")
    for r in rows.values():
        for key in ("fwd_s", "fb_s", "fwd_compile_s", "fb_compile_s", "tokens_per_s_fb",
                    "gflops_fb", "pct_ceiling_fb", "ratio_fb_vs_baseline", "flops_fb"):
            assert r[key] > 0, key
        assert len(r["fb_runs"]) == 1
    assert rows[("linattn_chunked", 32)]["ratio_fb_vs_baseline"] == pytest.approx(1.0)
    assert [(d["mixer"], d["context"]) for d in data["decode"]] == [
        ("ttt_linear", 32), ("linattn_chunked", 32)]
    batch = {r["mixer"]: r for r in data["batch"]}  # the batch rows: baseline and TTT-Linear
    assert batch["ttt_linear"]["batch"] == 2 and batch["ttt_linear"]["ratio_fb_vs_baseline"] > 0
    assert batch["linattn_chunked"]["ratio_fb_vs_baseline"] == pytest.approx(1.0)
    assert "skipped" in batch["ttt_linear_pallas"]
    names = [t["target"] for t in data["targets"]]
    # the delta-rule family's targets (with the ops-alone rows: + 3)
    family = 2 + 1 + 3 + 4 * 2 + len(bench_report.FAMILY_DECODE)
    assert len(names) == 17 + family
    assert all(set(t) >= {"value", "limit", "ok"} for t in data["targets"])
    assert any("at batch 2" in n and t["value"] for n, t in zip(names, data["targets"],
                                                                strict=True))
    md = (out / "bench.md").read_text()
    assert "| mixer | N | fwd ms | fwd+bwd ms |" in md and "| ttt_linear | 32 |" in md
    assert "| ttt_linear | 2 | 32 |" in md  # the batch table
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    (small,) = data["small"]  # the small-model loop: the real data pipeline and train step
    assert small["spec"] == "experiments/mqar.py:softmax,smoke" and small["steps_per_s"] > 0
    assert small["cpu_s_per_step"] > 0 and small["batch"] == 2 and small["seq_len"] == 64
    assert "| experiments/mqar.py:softmax,smoke (`experiments/mqar.py:softmax,smoke`) |" in md
    assert result["date"] == data["date"]


def test_bench_rejects_unknown_mixer(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path), "--mixers", "no_such_mixer"])


def test_sweep_records_out_of_memory_and_goes_on(monkeypatch):
    """A case that runs out of memory is recorded, the mixer's larger N are skipped, the other
    mixers still run; any other error still propagates."""
    def fake_measure(label, N, runs, **_):
        if label == "ttt_linear" and N >= 64:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9GiB")
        return {"fwd_s": 1e-3, "fb_s": 2e-3, "fwd_compile_s": 1.0, "fb_compile_s": 1.0}

    monkeypatch.setattr(bench, "measure_layer", fake_measure)
    rows = bench.sweep(["ttt_linear", "linattn_chunked"], [32, 64, 128], 1, 99.0, 1e9,
                       log=lambda *_: None)
    by = {(r["mixer"], r["N"]): r for r in rows}
    assert "skipped" not in by[("ttt_linear", 32)]
    assert by[("ttt_linear", 64)]["skipped"].startswith("out of memory: RESOURCE_EXHAUSTED")
    assert by[("ttt_linear", 128)]["skipped"] == "out of memory at N=64"
    assert all("skipped" not in by[("linattn_chunked", n)] for n in (32, 64, 128))

    monkeypatch.setattr(bench, "measure_layer",
                        lambda *a, **k: (_ for _ in ()).throw(ValueError("a real bug")))
    with pytest.raises(ValueError, match="a real bug"):
        bench.sweep(["ttt_linear"], [32], 1, 99.0, 1e9, log=lambda *_: None)


def test_bench_train_tiny_run(tmp_path):
    """One train step of the tiny LM: the table and json are written, figures are positive."""
    from experiments import bench_train

    out = tmp_path / "train"
    bench_train.main(["--out", str(out), "--preset", "tiny", "--seq-len", "32", "--batch", "1",
                      "--steps", "1", "--mixers", "ttt_linear", "--dtype", "float32"])
    data = json.loads((out / "bench_train.json").read_text())
    (row,) = data["rows"]
    assert row["mixer"] == "ttt_linear" and row["step_s"] > 0 and row["tokens_per_s"] > 0
    assert row["model_flops"] == bench_train.model_flops("tiny", "ttt_linear", 32, 1) > 0
    assert "| ttt_linear |" in (out / "bench_train.md").read_text()
    with pytest.raises(SystemExit):
        bench_train.main(["--out", str(out), "--mixers", "nope"])


def test_decode_rows_say_when_the_step_closes_a_lact_chunk():
    rows = [bench.measure_decode("lact", ctx, runs=1, width=32, heads=2) for ctx in (1024, 2048)]
    assert [r["closes_chunk"] for r in rows] == [False, True]  # chunk 2048: position 2047 ends it
    assert bench.measure_decode("ttt_linear", 2048, runs=1, width=32, heads=2)["closes_chunk"] \
        is False
    lines = bench_report.decode_table(rows)
    assert lines[-3].startswith("| lact | ") and lines[-3].endswith(" † |"), lines
    assert lines[-3].count("†") == 1 and lines[-1].startswith("† this step closes a chunk")


def test_gpu_lact_smoke_writes_the_fraction_of_the_bf16_matmul_rate(tmp_path, capsys):
    from experiments import gpu_lact

    assert gpu_lact.main(["--smoke", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "lact.json").read_text())
    attrs = dict(bench.LABELS["lact"][1], chunk=64)
    assert r["dtype"] == "bfloat16" and (r["n"], r["batch"], r["width"]) == (256, 2, 64)
    assert r["flops_fb"] == 3 * 2 * forward_flops("lact", 256, 64, 4, **attrs)
    peak = max(r["matmul_flops_per_s"].values())
    assert r["fraction_of_matmul"] == pytest.approx(r["flops_fb"] / r["fb_s"] / peak)
    assert r["met"] == (r["fraction_of_matmul"] >= 0.5)
    assert "% of the bf16 matmul rate" in capsys.readouterr().out


def test_the_delta_rule_family_targets_read_their_rows():
    """Each family target is the ratio of the rows it names (None where a row is missing)."""
    def row(mixer, N, fb_s, pct=None):
        return {"mixer": mixer, "N": N, "fb_s": fb_s, "pct_ceiling_fb": pct}

    rows = [row("linattn_chunked", 2048, 1.0, 40.0), row("deltanet", 2048, 1.2),
            row("gated_deltanet", 2048, 1.5), row("ttt_linear_primal_mb1", 2048, 30.0),
            row("mamba2", 2048, 2.0, 20.0), row("ttt_linear", 2048, 1.0),
            row("ttt_linear_gate", 2048, 1.05)]
    dec = {("deltanet", 16384): 1.05, ("deltanet", 1024): 1.0}
    got = {t["target"]: t for t in bench_report.family_targets(rows, dec)}
    assert got["deltanet fwd+bwd / linattn_chunked at N=2048"]["value"] == pytest.approx(1.2)
    assert got["deltanet fwd+bwd / linattn_chunked at N=2048"]["ok"] is True
    assert got["ttt_linear primal mini-batch 1 / deltanet fwd+bwd time at N=2k"]["value"] == \
        pytest.approx(25.0)
    gated = got["gated_deltanet / deltanet fwd+bwd time at N=2048"]
    assert gated["value"] == pytest.approx(1.25) and gated["ok"] is False  # > 1.15
    eff = got["mamba2 / linattn_chunked fwd+bwd % of matmul ceiling at N=2048"]
    assert eff["value"] == pytest.approx(0.5) and eff["ok"] is False  # < 0.75
    assert got["ttt_linear with a gate / without, fwd+bwd time at N=2048"]["ok"] is True
    assert got["deltanet decode step latency ctx 16k / ctx 1k"]["value"] == pytest.approx(1.05)
    assert got["deltanet fwd+bwd / linattn_chunked at N=8192"]["value"] is None  # not run
    assert got["mamba2 decode step latency ctx 16k / ctx 1k"]["ok"] is None


def test_ops_alone_rows_ratios_and_targets(monkeypatch):
    """The ops-alone rows: each op runs forward+backward at a tiny shape; `finish` adds their
    time and FLOP ratios to linear attention; the ops' targets read the rows they name."""
    rows = [bench_ops.measure_op(op, 40, 1, heads=2, d=8) for op in bench_ops.OPS]
    assert all(r["fb_s"] > 0 and r["flops_fb"] == 3 * r["flops_fwd"] > 0 for r in rows)
    # the FLOPs are the algorithms' (ttt.layers.costs): N = 40 pads to one chunk of 64, whose
    # inverse costs 2 (64³ − 64) / 3; online GD costs 8 d² per token
    la, dr = rows[0]["flops_fwd"], rows[2]["flops_fwd"]
    assert la == 2 * (4 * 40 * 64 * 8 + 4 * 40 * 8 * 8)
    assert dr == 2 * (6 * 64 * 64 * 8 + 4 * 64 * 64 * 8 + 6 * 64 * 8 * 8 + 2 * (64**3 - 64) / 3)
    assert rows[4]["flops_fwd"] == 2 * 40 * 8 * 8 * 8
    result = {"ceiling_gflops": 1.0, "layers": [], "machine": {"backend": "cpu"},
              "ops": [{**r, "fb_s": t} for r, t in zip(
                  rows, (1.0, 1.2, 2.0, 2.5, 50.0), strict=True)]}
    bench_report.finish(result)
    by_op = {r["op"]: r for r in result["ops"]}
    assert by_op["delta_rule"]["ratio_fb_vs_baseline"] == pytest.approx(2.0)
    assert by_op["delta_rule"]["flop_ratio_vs_baseline"] == pytest.approx(dr / la)
    got = {t["target"]: t for t in result["targets"]}
    assert got["op delta_rule / linear_attention fwd+bwd at N=2048"]["value"] is None  # not run
    result["ops"] = [{**r, "N": 2048} for r in result["ops"]]
    got = {t["target"]: t for t in bench_report.family_targets([], {}, result["ops"])}
    assert got["op delta_rule / linear_attention fwd+bwd at N=2048"]["value"] == \
        pytest.approx(2.0)
    primal = got["op ttt_primal_mb1 / delta_rule fwd+bwd at N=2k"]
    assert primal["value"] == pytest.approx(25.0) and primal["ok"] is True
    assert "| delta_rule | 2048 |" in "\n".join(bench_report.ops_table(result["ops"]))
    # the sweep stops at MAX_N (online GD's per-token states would not fit much beyond)
    monkeypatch.setattr(bench_ops, "measure_op", lambda op, N, *a: {"op": op, "N": N, "fb_s": 1.0})
    swept = bench_ops.sweep_ops(["delta_rule"], [32, bench_ops.MAX_N, 2 * bench_ops.MAX_N], 1,
                                lambda *a: None, 2, 8)
    assert [r["N"] for r in swept] == [32, bench_ops.MAX_N]


def test_every_label_names_a_registry_mixer_and_its_options():
    from ttt.layers import MIXERS

    for name, kwargs in bench.LABELS.values():
        MIXERS[name].check_kwargs(kwargs)  # an option the module lacks would fail here
    assert set(bench.DECODE_LABELS) <= set(bench.LABELS)
    assert set(bench_report.FAMILY_DECODE) <= set(bench.DECODE_LABELS)


def test_decode_contexts_are_timed_in_alternating_calls(monkeypatch):
    """Every context gets `runs` timed calls, taken in turn (1k, 16k, 1k, 16k, ...)."""
    order = []
    real = bench._decode_call

    def traced(label, ctx, width, heads):
        call = real(label, ctx, width, heads)
        return lambda: (order.append(ctx), call())[1]

    monkeypatch.setattr(bench, "_decode_call", traced)
    rows = bench.measure_decode_contexts("deltanet", [1024, 16384], runs=3, width=32, heads=2)
    assert [r["context"] for r in rows] == [1024, 16384]
    assert all(len(r["runs"]) == 3 and r["step_s"] > 0 for r in rows)
    assert order == [1024, 16384] * 3
