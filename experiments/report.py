"""Summaries of finished runs and the comparison report: markdown tables with mean ± standard
deviation over seeds, findings that survive the spread, PNG figures and `results.json`.

Everything here reads only what a run leaves in its workdir — `config.json` (the resolved config
the trainer writes), `metrics.jsonl` (one JSON line per logged step), `eval/validation.json`
(`ttt.evaluate`: the loss by token position) — plus `run.json` when the run was launched by
`experiments.compare` (its cell, seed, learning rate, wall and CPU time). So a run started by hand
with `python -m ttt.main` can join a report too (as a cell of its own).

Runs of the same cell (same group and cell name, one per seed) are aggregated: tables show
mean ± sd (n seeds). A difference between two cells is a **finding** only with at least
MIN_SEEDS (3) seeds on each side and when it exceeds the spread, |Δ mean| > sd₁ + sd₂ (for two
position ranges of the same runs, the paired form: the mean per-seed difference exceeds twice
the standard deviation of those differences); with fewer seeds the verdict reads "n/a: seeds"
(two seeds give a standard deviation too loose to hold anything apart).

A hybrid stack (`model.pattern`) is reported by its variant name (e.g. `ttt_linear×3+swa`) and
its state size is the mean over its layers of each layer's state (floats per layer).
Training curves come from the logged train points; a run with fewer than two of them (a cut run
logs every 25 or 50 steps) is drawn from its eval points instead and its legend says so.

Groups, by what the config trains:
  mqar    MQAR: accuracy on the answer positions against state size per layer, the sweep's rates
  lm      language model on text: validation loss, bits per byte, loss by token position
  init    an LM started from a trained Transformer (config.init.transformer_workdir) vs the same
          LM from scratch (the lm cell of the same spec)
  ladder  the TTT-LM ablation ladder (configs with a `rung` key): validation loss per rung
  vision  ViT classifiers: accuracy against MTTT inner steps T, inner loss over training
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Iterable

import ml_collections as mlc

from experiments import report_plots as plots
from experiments.ablation import RUNGS
from ttt import files
from ttt.evaluate import read_result
from ttt.layers import mixer_spec
from ttt.layers import state_size as registry_state_size
from ttt.models import model_mixer
from ttt.models import param_count as count_params
from ttt.models.hybrid import parse_pattern, resolve_pattern
from ttt.models.presets import model_sizes
from ttt.train.setup import abstract_params

GROUPS = ("mqar", "lm", "init", "ladder", "vision")
VALIDATED = 0.99  # softmax attention's MQAR accuracy that makes the harness a measurement
MIN_SEEDS = 3  # seeds per side before a difference can be a finding
NA_SEEDS = "n/a: seeds"


# ----------------------------------------------------------------------------- reading a run


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl` in step order ({"step": int, "<name>": float, ...}).

    A torn line (a kill mid-write) is dropped, and a step logged twice (a run resumed by an
    older trainer, which appended the steps after its checkpoint again) keeps its latest row,
    one train row and one eval row per step."""
    latest: dict[tuple[int, bool], dict] = {}
    for row in files.read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        if isinstance(row.get("step"), int):
            latest[(row["step"], "eval/loss" in row)] = row
    return [latest[k] for k in sorted(latest)]


def group_of(config: dict) -> str:
    """Which table a run belongs in (see the module docstring)."""
    if config["model"]["kind"] == "vit":
        return "vision"
    if "rung" in config:
        return "ladder"
    if (config.get("init") or {}).get("transformer_workdir"):
        return "init"
    return "mqar" if config["data"]["name"] == "mqar" else "lm"


def _dims(model: dict) -> tuple[int, int, int]:
    """(layers, width C, heads H) of a resolved model config."""
    sizes = model_sizes(model)
    return sizes["num_layers"], sizes["width"], sizes["num_heads"]


def _tokens(config: dict) -> int:
    """Sequence length of a resolved config: the LM's context, or the ViT's patches / pixels."""
    model = config["model"]
    if model["kind"] == "lm":
        return int(config["data"]["seq_len"])
    patch = model.get("patch_size") or 1
    return (int(model["image_size"]) // patch) ** 2


def state_size(config: dict) -> int:
    """Floats of recurrent state per layer per sequence (docs/design.md §13, the MQAR x-axis): the
    registry's `state_size` of the mixer the model builds (`ttt.layers.costs`: TTT and MTTT inner
    weights, linear attention's S (+ s), softmax's KV cache of the whole sequence). A hybrid
    stack: the mean over its layers (the pattern repeats evenly, so over the pattern's entries,
    each with its own arguments, `ttt.models.hybrid.resolve_pattern`), rounded."""
    model = config["model"]
    L, C, H = _dims(model)
    names = parse_pattern(model.get("pattern"))
    if not names:
        name = model_mixer(model["kind"], model["mixer"])
        return registry_state_size(name, C, H, _tokens(config),
                                   **(model.get("mixer_kwargs") or {}))
    per_entry = [registry_state_size(name, C, H, _tokens(config), **kw) for name, kw in
                 resolve_pattern(model["kind"], names, model.get("mixer_kwargs"), L)]
    return round(statistics.fmean(per_entry))


def variant(config: dict) -> str:
    """The name a run's model goes by in the tables: its mixer, `+gate` for a gated TTT layer,
    a hybrid's pattern with repeats counted (`ttt_linear×3+swa`)."""
    model = config["model"]
    names = parse_pattern(model.get("pattern"))
    if names:
        runs: list[list] = []
        for name in names:
            if runs and runs[-1][0] == name:
                runs[-1][1] += 1
            else:
                runs.append([name, 1])
        return "+".join(name if k == 1 else f"{name}×{k}" for name, k in runs)
    gate = (model.get("mixer_kwargs") or {}).get("gate")
    return model["mixer"] + ("+gate" if gate else "")


def param_count(config: dict) -> int:
    """Parameters of the model, counted on abstract shapes (nothing is allocated)."""
    _, params = abstract_params(mlc.ConfigDict(config))
    return count_params(params)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _inner_curves(rows: list[dict]) -> dict[int, tuple[list[int], list[float]]]:
    """Inner step t -> (outer steps, layer-mean inner loss at W_t) from the flattened aux."""
    prefix = "train/aux/inner_losses/"
    by_t: dict[int, dict[int, list[float]]] = {}
    for r in rows:
        for k, v in r.items():
            if not k.startswith(prefix):
                continue
            parts = k[len(prefix):].split("/")  # layer_i[/t]
            t = int(parts[1]) if len(parts) > 1 else 0
            by_t.setdefault(t, {}).setdefault(r["step"], []).append(v)
    return {t: (sorted(s), [statistics.fmean(s[k]) for k in sorted(s)]) for t, s in by_t.items()}


def _json(path: str) -> dict:
    """A JSON file's dict; {} when it is missing or cut off."""
    return files.read_json(path) or {}


def summarize(run_dir: str) -> dict:
    """One run's row of the report, from its workdir's files."""
    config = _json(os.path.join(run_dir, "config.json"))
    info = _json(os.path.join(run_dir, "run.json"))
    rows = read_metrics(run_dir)
    group = info.get("group") or group_of(config)
    unit = "images" if config["model"]["kind"] == "vit" else "tokens"
    _, rates = _series(rows, f"train/{unit}_per_s")
    evals = [r for r in rows if "eval/loss" in r]
    last = evals[-1] if evals else {}
    kw = config["model"].get("mixer_kwargs") or {}
    diverged = bool(info.get("diverged"))
    name = info.get("name") or os.path.basename(os.path.normpath(run_dir))
    out = {
        "name": name, "cell": name, "key": info.get("key"), "group": group, "dir": run_dir,
        "spec": info.get("spec", ""), "seed": info.get("seed", config["train"].get("seed", 0)),
        "lr": float(config["optim"]["lr"]), "diverged": diverged,
        "mixer": config["model"]["mixer"], "variant": variant(config), "mixer_kwargs": kw,
        "params": param_count(config), "state": state_size(config),
        "seq_len": config["data"].get("seq_len"), "steps": rows[-1]["step"] if rows else 0,
        # a diverged run scores nothing: accuracy 0, loss unknown
        "eval_loss": math.nan if diverged else last.get("eval/loss", math.nan),
        "eval_accuracy": 0.0 if diverged else last.get("eval/accuracy", math.nan),
        # the first logged rate includes compilation, so it is left out
        "throughput": statistics.median(rates[1:]) if len(rates) > 1 else
        (rates[0] if rates else math.nan),
        "unit": unit, "wall_s": info.get("wall_s", math.nan), "cpu_s": info.get("cpu_s", math.nan),
        "steps_per_s": info.get("steps_per_s", math.nan),
        "train_curve": _series(rows, "train/loss"),
        "eval_curve": _series(rows, "eval/accuracy"),
        "eval_loss_curve": _series(rows, "eval/loss"),
        "init": (config.get("init") or {}).get("transformer_workdir"),
        "selected": True,
    }
    by_pos = read_result(os.path.join(run_dir, "eval", "validation.json")) or {}
    if by_pos.get("loss_by_position"):
        out.update(loss_by_position=by_pos["loss_by_position"], full_eval_loss=by_pos["loss"],
                   eval_cpu_s=by_pos.get("cpu_s", 0.0))
    if group == "mqar":
        out.update(num_kv_pairs=config["data"].get("num_kv_pairs"),
                   width=_dims(config["model"])[1])
    if group == "ladder":
        out.update(rung=config["rung"], paper_perplexity=config.get("paper_perplexity"))
    if group == "vision":
        spec = mixer_spec(config["model"]["mixer"])
        out.update(T=spec.attrs(**kw)["steps"] if "steps" in spec.accepted() else None,
                   inner=_inner_curves(rows))
    return out


# ----------------------------------------------------------------------------- statistics


def cells(summaries: list[dict]) -> dict[str, list[dict]]:
    """Cell name -> its selected runs (one per seed), in first-seen order."""
    out: dict[str, list[dict]] = {}
    for s in summaries:
        if s.get("selected", True):
            out.setdefault(s["cell"], []).append(s)
    return out


def stats(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (nan for one value), n) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return statistics.fmean(vals), sd, len(vals)


def fmt_stats(s: tuple[float, float, int], spec: str = ".4f") -> str:
    """'0.9120 ± 0.0040' (or the bare mean for one seed, '—' for none)."""
    mean, sd, n = s
    if n == 0:
        return "—"
    return format(mean, spec) if n == 1 else f"{mean:{spec}} ± {sd:{spec.lstrip('+')}}"


def verdict(a: tuple[float, float, int], b: tuple[float, float, int]) -> str:
    """'finding' when |Δ mean| > sd_a + sd_b, else 'within spread'; 'n/a: seeds' when either
    side has fewer than MIN_SEEDS seeds."""
    if a[2] < MIN_SEEDS or b[2] < MIN_SEEDS:
        return NA_SEEDS
    return "finding" if abs(a[0] - b[0]) > a[1] + b[1] else "within spread"


def paired_verdict(diffs: list[float]) -> str:
    """For per-seed differences of one quantity (two position ranges of the same runs):
    'finding' when |mean| > 2 sd of the differences, the paired form of |Δ| > sd₁ + sd₂
    ('n/a: seeds' for fewer than MIN_SEEDS)."""
    mean, sd, n = stats(diffs)
    if n < MIN_SEEDS:
        return NA_SEEDS
    return "finding" if abs(mean) > 2 * sd else "within spread"


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ranking(named: dict[str, tuple[float, float, int]], higher_better: bool,
             spec: str) -> list[str]:
    """Name -> stats, sorted best first; each neighbouring pair with its Δ and verdict."""
    entries = sorted(((s, name) for name, s in named.items()),
                     key=lambda e: (-e[0][0] if higher_better else e[0][0]))
    out = []
    for (a, na), (b, nb) in zip(entries, entries[1:], strict=False):
        if math.isnan(a[0]) or math.isnan(b[0]):
            continue
        out.append(f"{na} vs {nb}: Δ {a[0] - b[0]:+{spec}} ({verdict(a, b)})")
    return out


# ----------------------------------------------------------------------------- groups


def mqar_table(runs: list[dict]) -> str:
    """MQAR: accuracy (mean ± sd) per (mixer, length, pairs, width) with state size and rate."""
    cellmap = cells(runs)
    order = sorted(cellmap.values(), key=lambda c: (c[0]["seq_len"], c[0]["num_kv_pairs"],
                                                    c[0]["width"], c[0]["state"],
                                                    c[0]["variant"]))
    return _table(
        ["mixer", "seq len", "kv pairs", "width", "state floats/layer", "accuracy", "seeds", "lr",
         "steps", "steps/s", "wall s"],
        [[c[0]["variant"], str(c[0]["seq_len"]), str(c[0]["num_kv_pairs"]), str(c[0]["width"]),
          f"{c[0]['state']:,}", fmt_stats(stats(r["eval_accuracy"] for r in c), ".3f"),
          str(len(c)), f"{c[0]['lr']:g}", str(c[0]["steps"]),
          _fmt(stats(r["steps_per_s"] for r in c)[0], ".1f"),
          _fmt(stats(r["wall_s"] for r in c)[0], ".0f")] for c in order])


def mqar_sweep_table(all_runs: list[dict]) -> str | None:
    """Accuracy of the sweep's first seed at each rate (* = the rate chosen), or None."""
    by_cell: dict[str, dict[float, dict]] = {}
    seed0: dict[str, int] = {}
    for r in all_runs:
        seed0[r["cell"]] = min(seed0.get(r["cell"], r["seed"]), r["seed"])
    for r in all_runs:
        if r["seed"] == seed0[r["cell"]]:
            by_cell.setdefault(r["cell"], {})[r["lr"]] = r
    if not any(len(v) > 1 for v in by_cell.values()):
        return None
    lrs = sorted({lr for v in by_cell.values() for lr in v})
    rows = []
    for cell, runs in sorted(by_cell.items()):
        row = [cell]
        for lr in lrs:
            r = runs.get(lr)
            text = "—" if r is None else ("diverged" if r["diverged"] else
                                         _fmt(r["eval_accuracy"], ".3f"))
            row.append(text + (" *" if r is not None and r.get("selected") else ""))
        rows.append(row)
    return _table(["cell (first seed)", *[f"lr {lr:g}" for lr in lrs]], rows)


def mqar_findings(runs: list[dict]) -> list[str]:
    """The harness check (softmax ≥ 99% at every setting) and each setting's ranking; a
    setting is (length, pairs, width), named by its pairs alone when that is unambiguous."""
    cellmap = cells(runs)
    settings = sorted({(c[0]["seq_len"], c[0]["num_kv_pairs"], c[0]["width"])
                       for c in cellmap.values()})
    plain = len({kv for _, kv, _ in settings}) == len(settings)
    out = []
    for n, kv, width in settings:
        where = f"{kv} pairs" if plain else f"N={n}, {kv} pairs, width {width}"
        sub = {k: c for k, c in cellmap.items()
               if (c[0]["seq_len"], c[0]["num_kv_pairs"], c[0]["width"]) == (n, kv, width)}
        soft = [c for c in sub.values() if c[0]["variant"] == "softmax"]
        if soft:
            s = stats(r["eval_accuracy"] for r in soft[0])
            ok = s[0] >= VALIDATED
            out.append(f"{where}: softmax attention {fmt_stats(s, '.3f')} — "
                       + ("harness validated (≥ 0.99): the other rows measure the mixers"
                          if ok else "harness NOT validated (< 0.99): the rows measure the "
                          "budget as much as the mixers"))
        ranking = _ranking({c[0]["variant"]: stats(r["eval_accuracy"] for r in c)
                            for c in sub.values()}, True, ".3f")
        if ranking:
            out.append(f"{where}, best first: " + "; ".join(ranking))
    return out


def _seeds(cell: list[dict]) -> str:
    """'3', or '3 (2 diverged)': the diverged seeds have no loss or accuracy in the means."""
    bad = sum(r["diverged"] for r in cell)
    return f"{len(cell)} ({bad} diverged)" if bad else str(len(cell))


def lm_table(runs: list[dict]) -> str:
    """Language models: params, state, validation loss, bits per byte, accuracy (over the
    seeds that did not diverge), throughput."""
    return _table(
        ["variant", "mixer", "params", "state floats/layer", "val loss", "bits/byte",
         "val acc", "seeds", "tokens/s", "wall s"],
        [[c[0]["name"], c[0]["variant"], f"{c[0]['params']:,}", f"{c[0]['state']:,}",
          fmt_stats(stats(r["eval_loss"] for r in c)),
          fmt_stats(stats(r["eval_loss"] / math.log(2) for r in c)),
          fmt_stats(stats(r["eval_accuracy"] for r in c if not r["diverged"]), ".3f"),
          _seeds(c),
          _fmt(stats(r["throughput"] for r in c)[0], ",.0f"),
          _fmt(stats(r["wall_s"] for r in c)[0], ".0f")] for c in cells(runs).values()])


def position_ranges(n: int) -> list[tuple[int, int]]:
    """Octaves of token positions [1, 2), [2, 4), ..., the last one running to n:
    [(lo, hi)] with 1-based positions lo <= p < hi."""
    out, lo = [], 1
    while 2 * lo <= n:
        out.append((lo, 2 * lo))
        lo *= 2
    if out:
        out[-1] = (out[-1][0], n + 1)  # the last octave takes the positions up to n
    return out or [(1, n + 1)]


def _position_stats(runs: list[dict], ranges) -> list[list[float]]:
    """Per seed: mean loss over each position range."""
    return [list(plots.binned(r["loss_by_position"], ranges)) for r in runs
            if r.get("loss_by_position")]


def position_table(runs: list[dict]) -> tuple[str, list[str]] | None:
    """Loss by position in octaves (mean ± sd over seeds) and the findings: where each mixer's
    loss stops falling beyond its spread, and which mixer is ahead late in the context."""
    cellmap = {k: [r for r in c if r.get("loss_by_position")] for k, c in cells(runs).items()}
    cellmap = {k: c for k, c in cellmap.items() if c}
    if not cellmap:
        return None
    n = min(len(r["loss_by_position"]) for c in cellmap.values() for r in c)
    ranges = [r for r in position_ranges(n) if r[0] >= 4] or position_ranges(n)
    header = ["variant", *[f"{a}–{b - 1}" for a, b in ranges]]
    rows, findings = [], []
    for name, c in cellmap.items():
        per_seed = _position_stats(c, ranges)  # (seeds, ranges)
        rows.append([name, *[fmt_stats(stats(s[i] for s in per_seed)) for i in
                             range(len(ranges))]])
        last_gain = None
        for i in range(1, len(ranges)):
            if paired_verdict([s[i - 1] - s[i] for s in per_seed]) == "finding" and \
                    stats(s[i - 1] - s[i] for s in per_seed)[0] > 0:
                last_gain = i
        change = stats(s[-1] - s[-2] for s in per_seed) if len(ranges) > 1 else \
            (math.nan, math.nan, 0)
        last = f"positions {ranges[-1][0]}–{ranges[-1][1] - 1} vs the octave before: " \
            f"{fmt_stats(change, '+.4f')} nats"
        if len(per_seed) < MIN_SEEDS:
            where = f"{NA_SEEDS} ({len(per_seed)} < {MIN_SEEDS}; {last})"
        elif last_gain is None:
            where = f"no drop between neighbouring octaves exceeds the spread ({last})"
        elif last_gain == len(ranges) - 1:
            where = f"still improving at the end of the context ({last})"
        else:
            where = (f"improves up to the octave starting at {ranges[last_gain][0]}, flat beyond "
                     f"(later changes within the spread; {last})")
        findings.append(f"{name}: {where}")
    late = {name: stats(s[-1] for s in _position_stats(c, ranges)) for name, c in cellmap.items()}
    ranking = _ranking(late, False, ".4f")
    if ranking:
        findings.append(f"positions {ranges[-1][0]}–{ranges[-1][1] - 1}, lowest loss first: "
                        + "; ".join(ranking))
    return _table(header, rows), findings


def init_table(init_runs: list[dict], lm_runs: list[dict]) -> tuple[str, list[str]]:
    """Each init cell against the LM cell of the same spec trained from scratch, and the
    Transformer it started from."""
    lm_cells = cells(lm_runs)
    rows, findings = [], []
    for name, c in cells(init_runs).items():
        scratch = next((v for v in lm_cells.values() if v[0]["spec"] == c[0]["spec"]
                        and v[0]["variant"] == c[0]["variant"]), None)
        teacher = next((v for v in lm_cells.values() if v[0]["mixer"] == "softmax" and
                        v[0]["seq_len"] == c[0]["seq_len"]), None)
        a = stats(r["eval_loss"] for r in c)
        rows.append([name, "from the Transformer", fmt_stats(a), str(a[2])])
        if scratch:
            b = stats(r["eval_loss"] for r in scratch)
            rows.append([scratch[0]["name"], "from scratch", fmt_stats(b), str(b[2])])
            findings.append(f"{name}: from the Transformer − from scratch = {a[0] - b[0]:+.4f} "
                            f"nats ({verdict(a, b)})")
        if teacher:
            t = stats(r["eval_loss"] for r in teacher)
            rows.append([teacher[0]["name"], "the Transformer itself", fmt_stats(t), str(t[2])])
    return _table(["variant", "start", "val loss", "seeds"], rows), findings


def ladder_table(runs: list[dict]) -> str:
    """Ablation ladder: validation loss and perplexity per rung, change from the previous rung."""
    order = sorted(cells(runs).values(),
                   key=lambda c: RUNGS.index(c[0]["rung"]) if c[0]["rung"] in RUNGS else 99)
    rows, prev = [], None
    for i, c in enumerate(order):
        s = stats(r["eval_loss"] for r in c)
        delta = "—" if prev is None else f"{s[0] - prev[0]:+.4f}"
        rows.append([str(i + 1), c[0]["rung"], c[0]["mixer"], f"{c[0]['params']:,}",
                     fmt_stats(s), _fmt(math.exp(min(s[0], 80))), delta,
                     _fmt(c[0].get("paper_perplexity"), ".2f"), str(s[2]),
                     "—" if prev is None else verdict(s, prev)])
        prev = s
    return _table(["#", "rung", "mixer", "params", "val loss", "val ppl", "Δ loss",
                   "paper ppl (125M, Pile 2k)", "seeds", "Δ vs spread"], rows)


def vision_table(runs: list[dict]) -> str:
    """Vision: accuracy per MTTT inner-step count T and the inner loss before/after T steps."""
    order = sorted(cells(runs).values(),
                   key=lambda c: (c[0]["T"] is None, c[0]["T"] or 0, c[0]["name"]))
    rows = []
    for c in order:
        inner = c[0].get("inner") or {}
        t_last = max(inner) if inner else None
        before = inner[0][1][-1] if inner else math.nan
        after = inner[t_last][1][-1] if inner else math.nan
        rows.append([c[0]["name"], c[0]["mixer"], _fmt(c[0]["T"], "d"), f"{c[0]['params']:,}",
                     fmt_stats(stats(r["eval_accuracy"] for r in c), ".3f"),
                     fmt_stats(stats(r["eval_loss"] for r in c)), _fmt(before), _fmt(after),
                     str(len(c)), _fmt(stats(r["throughput"] for r in c)[0], ",.0f"),
                     _fmt(stats(r["wall_s"] for r in c)[0], ".0f")])
    return _table(["variant", "mixer", "T", "params", "val acc", "val loss",
                   "inner loss W0 (end)", "inner loss W_T (end)", "seeds", "images/s", "wall s"],
                  rows)


# ----------------------------------------------------------------------------- results.json


def _setting(s: dict) -> str:
    if s["group"] == "mqar":
        return f"n={s['seq_len']},kv={s['num_kv_pairs']},width={s['width']},lr={s['lr']:g}"
    if s["group"] == "ladder":
        return f"rung={s['rung']}"
    if s["group"] == "vision":
        return f"T={s['T']}"
    if s["group"] == "init":
        return f"ctx={s['seq_len']},init=transformer"
    return f"ctx={s['seq_len']}"


def results_rows(summaries: list[dict]) -> list[dict]:
    """One row per run and metric: group, cell, mixer, setting, seed, lr, selected (in the
    tables), metric, value (and the run's directory)."""
    out = []
    for s in summaries:
        base = {"group": s["group"], "cell": s["cell"], "mixer": s["mixer"],
                "variant": s["variant"],
                "setting": _setting(s), "seed": s["seed"], "lr": s["lr"],
                "selected": bool(s.get("selected", True)), "dir": s["dir"]}
        metrics = {"eval_loss": s["eval_loss"], "eval_accuracy": s["eval_accuracy"],
                   "state_floats": s["state"], "params": s["params"], "steps": s["steps"],
                   "steps_per_s": s["steps_per_s"], "wall_s": s["wall_s"], "cpu_s": s["cpu_s"],
                   "diverged": float(s["diverged"])}
        if s.get("loss_by_position"):
            n = len(s["loss_by_position"])
            for (a, b), v in zip(position_ranges(n), plots.binned(s["loss_by_position"],
                                                                  position_ranges(n)),
                                 strict=True):
                metrics[f"loss_positions_{a}-{b - 1}"] = float(v)
        for metric, value in metrics.items():
            value = float(value) if value is not None else math.nan
            out.append({**base, "metric": metric, "value": None if math.isnan(value) else value})
    return out


# ----------------------------------------------------------------------------- the report


TITLES = {"mqar": "MQAR (accuracy on the answer positions)",
          "lm": "Language model (bytes of the embedded corpus unless the header says otherwise)",
          "init": "TTT from a trained Transformer vs from scratch (same budget)",
          "ladder": "TTT-LM ablation ladder", "vision": "MTTT vision (embedded digits)"}


def _findings(lines: list[str]) -> list[str]:
    return [f"Findings (Δ beyond the spread with ≥ {MIN_SEEDS} seeds a side, else "
            f"'{NA_SEEDS}'; see the header):\n\n"
            + "\n".join(f"- {line}" for line in lines)] if lines else []


def build_report(summaries: list[dict], out_dir: str, *, header: str = "") -> str:
    """Write `out_dir/report.md`, the PNG plots and `results.json`; return the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    by_group: dict[str, list[dict]] = {}
    for s in summaries:
        by_group.setdefault(s["group"], []).append(s)
    selected = {g: [s for s in runs if s.get("selected", True)] for g, runs in by_group.items()}
    parts = ["# Comparison report", header.strip()] if header else ["# Comparison report"]
    for group in GROUPS:
        runs = selected.get(group)
        if not runs:
            continue
        parts.append(f"## {TITLES[group]}")
        if group == "mqar":
            parts.append(mqar_table(runs))
            sweep = mqar_sweep_table(by_group[group])
            if sweep:
                parts += ["Learning-rate sweep (first seed; * = the rate the table uses):", sweep]
            parts += _findings(mqar_findings(runs))
            plots.plot_mqar(cells(runs), os.path.join(out_dir, "mqar_accuracy_vs_state.png"))
            plots.plot_mqar_curves(cells(runs), os.path.join(out_dir, "mqar_curves.png"))
            parts += ["![MQAR accuracy vs state size](mqar_accuracy_vs_state.png)",
                      "![MQAR learning curves](mqar_curves.png)"]
        elif group == "lm":
            parts.append(lm_table(runs))
            findings = _ranking({k: stats(r["eval_loss"] for r in c)
                                 for k, c in cells(runs).items()}, False, ".4f")
            findings = [f"validation loss, lowest first: {'; '.join(findings)}"] if findings \
                else []
            position = position_table(runs)
            if position:
                parts += ["Validation loss by token position (nats/byte, mean over each octave "
                          "of positions; whole validation split):", position[0]]
                findings += position[1]
                plots.plot_loss_by_position(cells(runs), os.path.join(
                    out_dir, "lm_loss_by_position.png"), "Validation loss by token position")
                parts.append("![loss by position](lm_loss_by_position.png)")
            parts += _findings(findings)
            plots.plot_loss_curves(cells(runs), os.path.join(out_dir, "lm_loss.png"),
                                   TITLES[group])
            parts.append("![LM training loss](lm_loss.png)")
        elif group == "init":
            table, findings = init_table(runs, selected.get("lm", []))
            parts += [table, *_findings(findings)]
            scratch = {k: c for k, c in cells(selected.get("lm", [])).items()
                       if (c[0]["spec"], c[0]["variant"]) in {(r["spec"], r["variant"])
                                                              for r in runs}
                       or c[0]["variant"] == "softmax"}
            plots.plot_loss_curves({**cells(runs), **scratch},
                                   os.path.join(out_dir, "init_loss.png"), TITLES[group])
            parts.append("![init training loss](init_loss.png)")
        elif group == "ladder":
            parts.append(ladder_table(runs))
            plots.plot_loss_curves(cells(runs), os.path.join(out_dir, "ladder_loss.png"),
                                   TITLES[group])
            parts.append(f"![{TITLES[group]}](ladder_loss.png)")
        else:
            parts.append(vision_table(runs))
            plots.plot_vision(cells(runs), os.path.join(out_dir, "vision_accuracy_vs_T.png"),
                              os.path.join(out_dir, "vision_inner_loss.png"))
            parts += ["![accuracy vs T](vision_accuracy_vs_T.png)",
                      "![inner loss over training](vision_inner_loss.png)"]
    text = "\n\n".join(parts) + "\n"
    files.write_atomic(os.path.join(out_dir, "report.md"), text)
    files.write_json_atomic(os.path.join(out_dir, "results.json"), results_rows(summaries),
                            indent=0)
    return text
