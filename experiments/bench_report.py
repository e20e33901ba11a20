"""Tables, target checks and the plot of `experiments/bench.py` (pure functions of its JSON)."""

from __future__ import annotations

import argparse
import json
import os
import sys

MiB = 2.0**20
OP_BASELINE = "linear_attention"  # the ops-alone rows' ratios (experiments/bench_ops.py)


def row_line(row: dict) -> str:
    """One progress line for the log."""
    head = f"{row['mixer']:>18} N={row['N']:>6}"
    if "skipped" in row:
        return f"{head}  skipped: {row['skipped']}"
    peak = (row.get("fb_peak_bytes") or 0) / MiB
    return (f"{head}  fwd {row['fwd_s'] * 1e3:9.1f} ms  fwd+bwd {row['fb_s'] * 1e3:9.1f} ms  "
            f"compile {row['fwd_compile_s'] + row['fb_compile_s']:6.1f} s  peak {peak:8.1f} MiB")


def _find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and "skipped" not in r:
            return r
    return None


def finish(result: dict) -> None:
    """Add tokens/s, µs/token, GFLOP/s, % of ceiling, ratios to the baseline, and the targets."""
    ceiling = result["ceiling_gflops"]
    for rows in (result["layers"], result.get("batch", [])):
        for r in rows:
            if "skipped" in r:
                continue
            tokens = r["N"] * r.get("batch", 1)
            r["tokens_per_s_fwd"] = tokens / r["fwd_s"]
            r["tokens_per_s_fb"] = tokens / r["fb_s"]
            r["us_per_token_fb"] = r["fb_s"] / tokens * 1e6
            if r.get("flops_fwd") is not None:  # (a registered mixer may not state its FLOPs)
                r["gflops_fwd"] = r["flops_fwd"] / r["fwd_s"] / 1e9
                r["gflops_fb"] = r["flops_fb"] / r["fb_s"] / 1e9
                r["pct_ceiling_fb"] = 100.0 * r["gflops_fb"] / ceiling
            base = _find(rows, mixer=result["baseline"], N=r["N"])
            if base is not None:
                r["ratio_fb_vs_baseline"] = r["fb_s"] / base["fb_s"]
                r["ratio_fwd_vs_baseline"] = r["fwd_s"] / base["fwd_s"]
    ops = result.get("ops", [])
    for r in ops:
        r["gflops_fb"] = r["flops_fb"] / r["fb_s"] / 1e9
        r["pct_ceiling_fb"] = 100.0 * r["gflops_fb"] / ceiling
        base = _find(ops, op=OP_BASELINE, N=r["N"])
        if base is not None:
            r["ratio_fb_vs_baseline"] = r["fb_s"] / base["fb_s"]
            r["flop_ratio_vs_baseline"] = r["flops_fb"] / base["flops_fb"]
    result["targets"] = targets(result)


def _t(name, value, limit, ok_if="<=", note=""):
    if value is None:
        return {"target": name, "value": None, "limit": limit, "ok": None, "note": note or "n/a"}
    ok = value <= limit if ok_if == "<=" else value >= limit
    return {"target": name, "value": value, "limit": f"{ok_if} {limit}", "ok": ok, "note": note}


# fwd+bwd time over the baseline at 2k and 8k (batch 1), and at batch 8, per backend
# (None: no target on that backend; the tables still show the figure)
RATIO_LIMITS = {"cpu": {"ttt_linear": 1.2, "ttt_linear_mamba": 1.4, "ttt_mlp": 2.5, "batch": 1.1},
                "gpu": {"ttt_linear": 1.5, "ttt_linear_mamba": None, "ttt_mlp": 3.0,
                        "batch": None}}
KERNEL_SPEEDUP = 3.0  # the Pallas kernel's fwd+bwd at least this much faster than XLA (GPU)


def targets(result: dict) -> list[dict]:
    """The targets, evaluated on this run's numbers (None where a shape was not run)."""
    rows, out = result["layers"], []
    backend = result["machine"]["backend"]
    limits = RATIO_LIMITS["gpu" if backend == "gpu" else "cpu"]

    def per_tok(mixer, N):
        r = _find(rows, mixer=mixer, N=N)
        return None if r is None else r["fb_s"] / N

    def ratio(mixer, N):
        r = _find(rows, mixer=mixer, N=N)
        return None if r is None else r.get("ratio_fb_vs_baseline")

    big = max((r["N"] for r in rows if "skipped" not in r), default=None)
    for m in ("ttt_linear", "ttt_mlp"):
        hi = 32768 if _find(rows, mixer=m, N=32768) else big
        a, b = per_tok(m, hi), per_tok(m, 1024)
        out.append(_t(f"{m} fwd+bwd time/token at N={hi} / at N=1k",
                      None if a is None or b is None else a / b, 1.15))
    fast = lambda m: m if backend != "gpu" else f"{m}_pallas"  # the path a layer runs by default
    for N in (2048, 8192):
        for m in ("ttt_linear", "ttt_linear_mamba", "ttt_mlp"):
            label = fast(m) if m != "ttt_linear_mamba" else m  # (no Mamba kernel row)
            if limits[m] is not None:
                out.append(_t(f"{label} fwd+bwd / linattn_chunked at N={N}", ratio(label, N),
                              limits[m]))
    brows = result.get("batch", [])
    for m in ("ttt_linear",) if limits["batch"] is not None else ():
        r = _find(brows, mixer=m)
        out.append(_t(f"{m} fwd+bwd / linattn_chunked at batch {r['batch'] if r else 8}",
                      r.get("ratio_fb_vs_baseline") if r else None, limits["batch"],
                      note=f"N={r['N']}" if r else ""))
    if backend == "gpu":
        for m in ("ttt_linear", "ttt_mlp"):
            for N in (2048, 8192):
                x, k = _find(rows, mixer=m, N=N), _find(rows, mixer=f"{m}_pallas", N=N)
                out.append(_t(f"{m}: XLA / Pallas kernel fwd+bwd time at N={N}",
                              x["fb_s"] / k["fb_s"] if x and k else None, KERNEL_SPEEDUP, ">="))
    dual, primal = _find(rows, mixer="ttt_linear", N=2048), _find(rows, mixer="ttt_linear_primal",
                                                                   N=2048)
    out.append(_t("ttt_linear primal / dual fwd+bwd time at N=2k",
                  primal["fb_s"] / dual["fb_s"] if dual and primal else None, 3.0, ">="))
    worst = None
    for r in rows:
        if r["mixer"] == "softmax" and r["N"] >= 1024 and "skipped" not in r:
            t = _find(rows, mixer="ttt_linear", N=r["N"])
            if t is not None:
                worst = max(worst or 0.0, t["fb_s"] / r["fb_s"])
    out.append(_t("ttt_linear / softmax fwd+bwd time, worst N >= 1k (N where softmax ran)",
                  worst, 1.0, note="< 1 means TTT-Linear is faster"))
    dec = {(d["mixer"], d["context"]): d["step_s"] for d in result.get("decode", [])}
    a, b = dec.get(("ttt_linear", 16384)), dec.get(("ttt_linear", 1024))
    out.append(_t("ttt_linear decode step latency ctx 16k / ctx 1k",
                  a / b if a and b else None, 1.1))
    r8 = _find(rows, mixer=fast("ttt_linear"), N=8192)
    out.append(_t(f"{fast('ttt_linear')} fwd+bwd % of matmul ceiling at N=8k",
                  r8["pct_ceiling_fb"] if r8 else None, 45.0, ">="))
    r8 = _find(rows, mixer="lact", N=8192)
    out.append(_t("lact (chunk 2048) fwd+bwd % of matmul ceiling at N=8k",
                  r8["pct_ceiling_fb"] if r8 else None, 60.0, ">="))
    a, b = per_tok("lact", 32768), per_tok("lact", 2048)
    out.append(_t("lact fwd+bwd time/token at N=32k / at N=2k",
                  None if a is None or b is None else a / b, 1.1))
    remat = result.get("remat") or []
    if len(remat) == 2 and remat[0]["fb_peak_bytes"] and remat[1]["fb_peak_bytes"]:
        value = remat[1]["fb_peak_bytes"] / remat[0]["fb_peak_bytes"]
        note = f"N={remat[0]['N']}, remat_every={remat[1]['remat_every']}"
    else:
        value, note = None, ""
    out.append(_t("ttt_linear fwd+bwd peak memory with remat / without", value, 0.5, note=note))
    out += family_targets(rows, dec, result.get("ops", []))
    lm = {r["layers"]: r["compile_s"] for r in result.get("lm_compile", [])}
    out.append(_t("LM train-step compile time 24 layers / 12 layers",
                  lm[24] / lm[12] if 12 in lm and 24 in lm else None, 1.3))
    return out


# the delta-rule family: fwd+bwd time ratios (or efficiency ratios) at 2k and 8k, batch 1
FAMILY_LIMITS = {"deltanet_vs_linattn": 1.5, "primal_mb1_vs_deltanet": 20.0,
                 "gated_vs_deltanet": 1.15, "mamba2_efficiency": 0.75, "gate_cost": 1.10}
FAMILY_DECODE = ("ttt_linear_gate", "deltanet", "gated_deltanet", "mamba2", "titans", "swa")


def family_targets(rows: list[dict], dec: dict, ops=()) -> list[dict]:
    """The targets of the delta-rule family (None where a row was not run); the first two also
    on the ops alone when the run has them (what the layers around the ops add or hide)."""
    lim, out = FAMILY_LIMITS, []
    op = lambda name, N: (_find(ops, op=name, N=N) or {}).get("fb_s")

    def fb(mixer, N, key="fb_s"):
        r = _find(rows, mixer=mixer, N=N)
        return None if r is None else r[key]

    def over(a, b):
        return None if a is None or b is None else a / b

    for N in (2048, 8192):
        out.append(_t(f"deltanet fwd+bwd / linattn_chunked at N={N}",
                      over(fb("deltanet", N), fb("linattn_chunked", N)),
                      lim["deltanet_vs_linattn"]))
    out.append(_t("ttt_linear primal mini-batch 1 / deltanet fwd+bwd time at N=2k",
                  over(fb("ttt_linear_primal_mb1", 2048), fb("deltanet", 2048)),
                  lim["primal_mb1_vs_deltanet"], ">=", note="online GD, two ways"))
    if ops:
        for N in (2048, 8192):
            out.append(_t(f"op delta_rule / linear_attention fwd+bwd at N={N}",
                          over(op("delta_rule", N), op("linear_attention", N)),
                          lim["deltanet_vs_linattn"], note="the ops alone"))
        out.append(_t("op ttt_primal_mb1 / delta_rule fwd+bwd at N=2k",
                      over(op("ttt_primal_mb1", 2048), op("delta_rule", 2048)),
                      lim["primal_mb1_vs_deltanet"], ">=", note="the ops alone"))
    for N in (2048, 8192):
        out.append(_t(f"gated_deltanet / deltanet fwd+bwd time at N={N}",
                      over(fb("gated_deltanet", N), fb("deltanet", N)), lim["gated_vs_deltanet"],
                      note="paper configs: value heads 2d vs d"))
        out.append(_t(f"gated_deltanet_v1 / deltanet fwd+bwd time at N={N}",
                      over(fb("gated_deltanet_v1", N), fb("deltanet", N)),
                      lim["gated_vs_deltanet"], note="same value width: the gate's cost"))
        out.append(_t(f"mamba2 / linattn_chunked fwd+bwd % of matmul ceiling at N={N}",
                      over(fb("mamba2", N, "pct_ceiling_fb"),
                           fb("linattn_chunked", N, "pct_ceiling_fb")),
                      lim["mamba2_efficiency"], ">=", note="efficiency, not time"))
        out.append(_t(f"ttt_linear with a gate / without, fwd+bwd time at N={N}",
                      over(fb("ttt_linear_gate", N), fb("ttt_linear", N)), lim["gate_cost"]))
    for m in FAMILY_DECODE:
        a, b = dec.get((m, 16384)), dec.get((m, 1024))
        out.append(_t(f"{m} decode step latency ctx 16k / ctx 1k", over(a, b), 1.1))
    return out


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def decode_table(decode: list[dict]) -> list[str]:
    """Markdown lines of the decode rows: ms per step by context, † where the step closes a
    chunk (LaCT: its fast-weight update runs in that step)."""
    ctxs = sorted({d["context"] for d in decode})
    lines = ["Decode: latency of one step (ms, median) by context length.", "",
             "| mixer | " + " | ".join(f"ctx {c}" for c in ctxs) + " |",
             "|---|" + "---:|" * len(ctxs)]
    for m in dict.fromkeys(d["mixer"] for d in decode):
        vals = {d["context"]: d for d in decode if d["mixer"] == m}
        cell = lambda d: _fmt(d["step_s"] * 1e3, ".3f") + (" †" if d.get("closes_chunk") else "")
        lines.append(f"| {m} | " + " | ".join(cell(vals[c]) if c in vals else "—" for c in ctxs)
                     + " |")
    if any(d.get("closes_chunk") for d in decode):
        lines += ["", "† this step closes a chunk (position ctx − 1 is a chunk's last token): the "
                  "fast-weight update runs in it, once per chunk of tokens."]
    return lines


def ops_table(ops: list[dict]) -> list[str]:
    """Markdown lines of the ops-alone rows (experiments/bench_ops.py)."""
    first = ops[0]
    lines = [f"The ops alone (experiments/bench_ops.py): fwd+bwd per head, (1, {first['heads']}, "
             f"N, {first['head_dim']}); ratios to `{OP_BASELINE}` at the same N, in time and in "
             "FLOPs.", "",
             "| op | N | fwd+bwd ms | GFLOP (fwd) | GFLOP/s (fwd+bwd) | % ceiling | × time | "
             "× FLOPs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ops:
        lines.append(f"| {r['op']} | {r['N']} | {r['fb_s'] * 1e3:.1f} | "
                     f"{r['flops_fwd'] / 1e9:.2f} | {r['gflops_fb']:.1f} | "
                     f"{r['pct_ceiling_fb']:.0f} | {_fmt(r.get('ratio_fb_vs_baseline'), '.2f')} | "
                     f"{_fmt(r.get('flop_ratio_vs_baseline'), '.2f')} |")
    return lines


def markdown(result: dict) -> str:
    """The whole report as markdown: layer table, decode, remat, LM compile, targets."""
    c = result["ceiling_start"], result["ceiling_end"]
    lines = [
        f"Run {result['date']} — `{result['command']}` — {result['machine']['platform']}, "
        f"{result['machine']['cpu_count']} CPUs, jax {result['machine']['jax']} "
        f"({result['machine']['backend']}); {result['runs']} timed runs (median); "
        f"wall {result['wall_s'] / 60:.1f} min.",
        "",
        f"Matmul ceiling: {result['ceiling_gflops']:.1f} GFLOP/s (float32; start "
        f"{c[0]['ceiling_gflops']:.1f}, end {c[1]['ceiling_gflops']:.1f}). Shape: width "
        f"{result['shape']['width']}, {result['shape']['heads']} heads of "
        f"{result['shape']['head_dim']}, mini-batch 16, batch 1, float32. Ratios are fwd+bwd "
        "time over "
        f"`{result['baseline']}` at the same N, same run.",
        "",
        "| mixer | N | fwd ms | fwd+bwd ms | tok/s (fwd+bwd) | µs/tok (fwd+bwd) | compile s "
        "(fwd, fwd+bwd) | peak MiB (fwd+bwd) | GFLOP (fwd) | GFLOP/s (fwd+bwd) | % ceiling | "
        "× baseline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["layers"]:
        if "skipped" in r:
            lines.append(f"| {r['mixer']} | {r['N']} | skipped: {r['skipped']} ||||||||||")
            continue
        peak = r["fb_peak_bytes"] / MiB if r.get("fb_peak_bytes") else None
        lines.append(
            f"| {r['mixer']} | {r['N']} | {r['fwd_s'] * 1e3:.1f} | {r['fb_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s_fb']:.0f} | {r['us_per_token_fb']:.1f} | "
            f"{r['fwd_compile_s']:.1f}, {r['fb_compile_s']:.1f} | {_fmt(peak, '.0f')} | "
            f"{_fmt(r['flops_fwd'] and r['flops_fwd'] / 1e9, '.1f')} | "
            f"{_fmt(r.get('gflops_fb'), '.1f')} | {_fmt(r.get('pct_ceiling_fb'), '.0f')} | "
            f"{_fmt(r.get('ratio_fb_vs_baseline'), '.2f')} |")
    if result.get("batch"):
        lines += ["", "Batch rows: fwd+bwd of a batch of sequences (ratios to the baseline at the "
                  "same batch and N).", "",
                  "| mixer | batch | N | fwd ms | fwd+bwd ms | tok/s (fwd+bwd) | GFLOP/s (fwd+bwd) "
                  "| % ceiling | × baseline |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["batch"]:
            if "skipped" in r:
                lines.append(f"| {r['mixer']} | {r['batch']} | {r['N']} | skipped: "
                             f"{r['skipped']} ||||||")
                continue
            lines.append(
                f"| {r['mixer']} | {r['batch']} | {r['N']} | {r['fwd_s'] * 1e3:.1f} | "
                f"{r['fb_s'] * 1e3:.1f} | {r['tokens_per_s_fb']:.0f} | "
                f"{_fmt(r.get('gflops_fb'), '.1f')} | {_fmt(r.get('pct_ceiling_fb'), '.0f')} | "
                f"{_fmt(r.get('ratio_fb_vs_baseline'), '.2f')} |")
    if result.get("ops"):
        lines += ["", *ops_table(result["ops"])]
    if result.get("decode"):
        lines += ["", *decode_table(result["decode"])]
    if result.get("remat"):
        lines += ["", "Training memory of ttt_linear with mini-batch-group remat.", "",
                  "| N | remat_every | fwd+bwd ms | peak MiB |", "|---:|---:|---:|---:|"]
        for r in result["remat"]:
            lines.append(f"| {r['N']} | {r['remat_every']} | {r['fb_s'] * 1e3:.1f} | "
                         f"{_fmt((r['fb_peak_bytes'] or 0) / MiB, '.0f')} |")
    if result.get("lm_compile"):
        lines += ["", "Compile time of a TTT-Linear LM train step (scan_layers=True).", "",
                  "| layers | seq_len | compile s |", "|---:|---:|---:|"]
        for r in result["lm_compile"]:
            lines.append(f"| {r['layers']} | {r['seq_len']} | {r['compile_s']:.1f} |")
    if result.get("small"):
        lines += ["", "Small-model training loop (data pipeline + trainer step; CPU s per step "
                  "counts every thread of the process).", "",
                  "| config | params | batch × tokens | steps/s | tokens/s | CPU ms/step | "
                  "compile s |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["small"]:
            lines.append(f"| {r['label']} (`{r['spec']}`) | {r['params']:,} | {r['batch']} × "
                         f"{r['seq_len']} | {r['steps_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['cpu_s_per_step'] * 1e3:.0f} | {r['compile_s']:.1f} |")
    lines += ["", "Targets.", "", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "not run"}[t["ok"]]
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']}{note} | {_fmt(t['value'], '.3f')} | {t['limit']} | {met} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str) -> None:
    """Log-log time per token (fwd+bwd solid, fwd dashed) against N, one colour per mixer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    mixers = dict.fromkeys(r["mixer"] for r in result["layers"])
    for i, m in enumerate(mixers):
        rs = [r for r in result["layers"] if r["mixer"] == m and "skipped" not in r]
        if not rs:
            continue
        n = [r["N"] for r in rs]
        color = f"C{i % 10}"
        ax.loglog(n, [r["fb_s"] / r["N"] * 1e6 for r in rs], "o-", color=color, label=m)
        ax.loglog(n, [r["fwd_s"] / r["N"] * 1e6 for r in rs], "--", color=color, alpha=0.5)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("µs per token (solid: fwd+bwd, dashed: fwd)")
    ax.set_title("Mixers at the 125M layer shape (batch 1, float32)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ the tables in the docs
# `python -m experiments.bench_report docs/bench/bench.json --into docs/benchmarks.md` rewrites
# the lines between these two markers of the target file; `--check` only compares.
BEGIN = "<!-- bench tables: generated by"
END = "<!-- end of bench tables -->"


def machine_line(result: dict, source: str) -> str:
    """One line naming where the tables come from: the JSON, the run's date, the command that
    produced it, the CPU model (when the JSON records it), core count, backend and platform."""
    m = result.get("machine", {})
    where = [f"{m.get('cpu_count', '?')} CPUs"]
    if m.get("cpu"):
        where[0] = f"{m['cpu']}, {where[0]}"
    devices = m.get("devices") or []
    if m.get("backend") and m["backend"] != "cpu" and devices:
        where.append(f"{m['backend']}: {devices[0]}")
    where.append(m.get("platform", "platform not recorded"))
    return (f"Generated from [{source}]({source}), the run of {result.get('date', '?')} "
            f"(`{result.get('command', '?')}`) on {'; '.join(where)}.")


def generated_block(result: dict, source: str) -> str:
    """What goes between the markers: the provenance line, then `markdown(result)`."""
    return machine_line(result, source) + "\n\n" + markdown(result)


# The README's short speed table: a few mixers at three lengths, the decode latencies.
SUMMARY_BEGIN = "<!-- bench summary: generated by"
SUMMARY_END = "<!-- end of bench summary -->"
SUMMARY_MIXERS = ("ttt_linear", "ttt_linear_mamba", "ttt_mlp", "lact", "linattn_chunked",
                  "softmax")
SUMMARY_NS = (2048, 8192, 32768)
SUMMARY_RATIO_NS = (2048, 8192)


def summary(result: dict, source: str) -> str:
    """The README's speed table (µs per token of fwd+bwd, × the baseline) and decode line."""
    rows = {(r["mixer"], r["N"]): r for r in result["layers"]}
    size = lambda n: f"{n // 1024}k" if n % 1024 == 0 else str(n)  # noqa: E731
    head = " | ".join(f"at {size(n)}" for n in SUMMARY_NS)
    ratio_ns = " / ".join(size(n) for n in SUMMARY_RATIO_NS)
    lines = [machine_line(result, source) + " Fwd+bwd of one layer, µs per token:", "",
             f"| mixer | {head} | × {result['baseline']} at {ratio_ns} |",
             "|---|" + "---:|" * (len(SUMMARY_NS) + 1)]

    def cell(r):
        if r is None:
            return "not run"
        if "skipped" in r:
            why = r["skipped"]
            return "skipped (" + ("memory" if "memory" in why else "time budget" if "time" in why
                                  else "GPU only" if "GPU" in why else why.split(":")[0]) + ")"
        return f"{r['us_per_token_fb']:.1f}"

    for m in SUMMARY_MIXERS:
        if not any(k[0] == m for k in rows):
            continue
        ratios = [rows.get((m, n), {}).get("ratio_fb_vs_baseline") for n in SUMMARY_RATIO_NS]
        lines.append(f"| {m} | " + " | ".join(cell(rows.get((m, n))) for n in SUMMARY_NS)
                     + " | " + " / ".join(_fmt(x, ".2f") or "—" for x in ratios) + " |")
    decode = {(d["mixer"], d["context"]): d["step_s"] for d in result.get("decode", [])}
    if decode:
        ctxs = sorted({c for _, c in decode})
        parts = [f"{m} " + " / ".join(f"{decode[(m, c)] * 1e3:.3f}" for c in ctxs
                                       if (m, c) in decode)
                 for m in dict.fromkeys(m for m, _ in decode)]
        lines += ["", f"One decode step, ms at a context of {' / '.join(map(str, ctxs))}: "
                  + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


BLOCKS = ((BEGIN, END, generated_block), (SUMMARY_BEGIN, SUMMARY_END, summary))


def _split(text: str, path: str, begin_mark: str = BEGIN,
           end_mark: str = END) -> tuple[str, str, str]:
    """text -> (up to and including the begin line, the block, from the end line on)."""
    lines = text.splitlines(keepends=True)
    begin = [i for i, line in enumerate(lines) if line.startswith(begin_mark)]
    end = [i for i, line in enumerate(lines) if line.rstrip("\n") == end_mark]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise ValueError(f"{path}: expected one line starting {begin_mark!r} followed by one "
                         f"line {end_mark!r} (found {len(begin)} and {len(end)})")
    b, e = begin[0], end[0]
    return "".join(lines[:b + 1]), "".join(lines[b + 1:e]), "".join(lines[e:])


def current_block(path: str) -> str:
    """The text now between the markers of `path`."""
    with open(path) as f:
        return _split(f.read(), path)[1]


def _source(json_path: str, into: str) -> str:
    """The JSON's path relative to the target file (for its link)."""
    return os.path.relpath(json_path, os.path.dirname(os.path.abspath(into))).replace(os.sep, "/")


def expected_block(json_path: str, into: str) -> str:
    """The tables block `--into` writes from `json_path` (its link relative to the target file)."""
    with open(json_path) as f:
        result = json.load(f)
    return generated_block(result, _source(json_path, into))


def rewrite(json_path: str, into: str) -> tuple[str, str]:
    """(the text of `into` now, the text with every marked block it holds generated anew from
    `json_path`); ValueError if it holds none, or a broken pair of markers."""
    with open(json_path) as f:
        result = json.load(f)
    with open(into) as f:
        old = f.read()
    new, found = old, 0
    for begin_mark, end_mark, make in BLOCKS:
        if not any(line.startswith(begin_mark) for line in new.splitlines()):
            continue
        head, _, tail = _split(new, into, begin_mark, end_mark)
        new, found = head + make(result, _source(json_path, into)) + tail, found + 1
    if not found:
        raise ValueError(f"{into}: no line starting {BEGIN!r} or {SUMMARY_BEGIN!r}")
    return old, new


def main(argv=None) -> int:
    """Print the tables of a bench.json, or write them into a markdown file's marked blocks."""

    parser = argparse.ArgumentParser(
        description="The tables of a bench.json (experiments/bench.py) as markdown.")
    parser.add_argument("json", help="bench.json written by python -m experiments.bench")
    parser.add_argument("--into", help=f"a markdown file: rewrite the lines between its line "
                        f"starting {BEGIN!r} and its line {END!r} (the full tables), and "
                        f"between {SUMMARY_BEGIN!r} and {SUMMARY_END!r} (the short table)")
    parser.add_argument("--check", action="store_true",
                        help="with --into: write nothing; exit 1 if the block differs")
    args = parser.parse_args(argv)
    if args.check and not args.into:
        parser.error("--check needs --into FILE")
    try:
        if not args.into:
            with open(args.json) as f:
                sys.stdout.write(markdown(json.load(f)))
            return 0
        old, new = rewrite(args.json, args.into)
    except KeyError as err:
        print(f"error: {args.json}: no key {err} (not a bench.json of experiments/bench.py?)",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if old == new:
        print(f"{args.into}: the bench tables match {args.json}", file=sys.stderr)
        return 0
    if args.check:
        print(f"{args.into}: the bench tables differ from {args.json}; run python -m "
              f"experiments.bench_report {args.json} --into {args.into}", file=sys.stderr)
        return 1
    with open(args.into, "w") as f:
        f.write(new)
    print(f"{args.into}: bench tables written from {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
