"""The comparison report's figures (`experiments.report` calls these; PNGs next to report.md).

Every function takes cells (lists of run summaries, see `experiments.report.cells`) and a path;
curves of a cell are averaged over its seeds, with the ± one standard deviation band shaded when
there is more than one seed. A training curve with fewer than two logged train points (a cut
run) is drawn from the run's eval points and labelled so. Titles are wrapped to the figure's
width. Each PNG is written whole or not at all (`ttt.files`).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from ttt.files import save_figure_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(curves: list[tuple[list, list]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, sd) over the seeds' curves on the x values all of them share."""
    common = sorted(set.intersection(*(set(c[0]) for c in curves))) if curves else []
    ys = np.array([[dict(zip(*c, strict=True))[x] for x in common] for c in curves], float)
    if not common:
        return np.array([]), np.array([]), np.array([])
    sd = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.array(common), ys.mean(0), sd


def _band(ax, x, mean, sd, label, color, **kw):
    ax.plot(x, mean, label=label, color=color, **kw)
    if np.any(sd > 0):
        ax.fill_between(x, mean - sd, mean + sd, color=color, alpha=0.2, lw=0)


def wrap(title: str, width: int = 55) -> str:
    """A title broken into lines of at most `width` characters (a 6-inch figure's width)."""
    return "\n".join(textwrap.wrap(title, width)) or title


def loss_curve(run: dict) -> tuple[tuple[list, list], str]:
    """(steps, losses) of one run and where they come from: its train points when it logged at
    least two, else its eval points when it has at least two ("eval"), else whatever it has
    ("too few points")."""
    train = run["train_curve"]
    if len(train[0]) >= 2:
        return train, "train"
    evals = run.get("eval_loss_curve") or ([], [])
    if len(evals[0]) >= 2:
        return evals, "eval"
    return (train if len(train[0]) >= len(evals[0]) else evals), "too few points"


def plot_loss_curves(cells: dict[str, list[dict]], path: str, title: str) -> None:
    """Training loss against step, one line per cell (mean over seeds); a cell whose runs have
    too few train points is drawn from the eval points (see `loss_curve`), marked in its label."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, runs) in enumerate(cells.items()):
        picked = [loss_curve(r) for r in runs]
        source = "train" if all(s == "train" for _, s in picked) else \
            "eval" if all(s != "too few points" for _, s in picked) else "too few points"
        curves = [c if source == "train" else (r.get("eval_loss_curve") or c)
                  for r, (c, _) in zip(runs, picked, strict=True)]
        x, mean, sd = _mean_curve([c for c in curves if c[0]])
        note = "" if source == "train" else f", {source}"
        if len(x):
            _band(ax, x, mean, sd, f"{name} (n={len(runs)}{note})", f"C{i % 10}", marker=".")
    ax.set(xlabel="training step", ylabel="loss (nats/token)", title=wrap(title))
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def plot_mqar(cells: dict[str, list[dict]], path: str) -> None:
    """Accuracy (mean ± sd over seeds) against state floats per layer (Zoology's plot); color =
    variant, marker = (length, pairs); a variant's points at several widths of one setting (the
    capacity frontier) are joined by a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    settings = sorted({(r[0]["seq_len"], r[0]["num_kv_pairs"]) for r in cells.values()})
    markers = dict(zip(settings, "osD^v<>p*", strict=False))
    colors: dict[str, str] = {}
    for runs in cells.values():
        r0 = runs[0]
        acc = [r["eval_accuracy"] for r in runs]
        color = colors.setdefault(r0["variant"], f"C{len(colors) % 10}")
        sd = float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0
        ax.errorbar(r0["state"], float(np.mean(acc)), yerr=sd, color=color, capsize=3,
                    marker=markers[(r0["seq_len"], r0["num_kv_pairs"])], ms=6, ls="none")
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for runs in cells.values():
        r0 = runs[0]
        key = (r0["variant"], r0["seq_len"], r0["num_kv_pairs"])
        lines.setdefault(key, []).append((r0["state"], float(np.mean(
            [r["eval_accuracy"] for r in runs]))))
    for (name, _, _), pts in lines.items():
        if len(pts) > 1:
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot(xs, ys, color=colors[name], lw=1, alpha=0.7)
    for m, c in colors.items():
        ax.scatter([], [], color=c, label=m)
    for (n, kv), mk in markers.items():
        ax.scatter([], [], color="gray", marker=mk, label=f"N={n}, pairs={kv}")
    ax.set_xscale("log")
    ax.set(xlabel="recurrent state (floats per layer per sequence)", ylabel="MQAR accuracy",
           title="MQAR accuracy vs state size (mean ± sd over seeds)", ylim=(-0.02, 1.02))
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def plot_mqar_curves(cells: dict[str, list[dict]], path: str) -> None:
    """Validation accuracy against step (mean over seeds), one panel per pair count: the
    learning curves that show whether a run had the budget to solve the task. Panels are per
    (length, pairs, width), titled by the pairs alone when that is unambiguous."""
    plt = _plt()
    setting = lambda r: (r["seq_len"], r["num_kv_pairs"], r["width"])  # noqa: E731
    pairs = sorted({setting(runs[0]) for runs in cells.values()})
    plain = len({p[1] for p in pairs}) == len(pairs)
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
    mixers = sorted({runs[0]["variant"] for runs in cells.values()})
    for ax, kv in zip(axes[0], pairs, strict=True):
        for runs in cells.values():
            if setting(runs[0]) != kv:
                continue
            x, mean, sd = _mean_curve([r["eval_curve"] for r in runs if r["eval_curve"][0]])
            if len(x):
                color = f"C{mixers.index(runs[0]['variant']) % 10}"
                _band(ax, x, mean, sd, f"{runs[0]['variant']} (lr {runs[0]['lr']:g})", color,
                      marker=".")
        title = f"{kv[1]} pairs" if plain else f"N={kv[0]}, {kv[1]} pairs, width {kv[2]}"
        ax.set(xlabel="training step", ylabel="validation accuracy", title=title,
               ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def log_bins(n: int, per_octave: int = 4) -> list[tuple[int, int]]:
    """Position ranges [lo, hi) covering 1..n, log-spaced (about `per_octave` per doubling)."""
    edges = sorted({int(round(2 ** (i / per_octave))) for i in range(
        int(per_octave * math.log2(n)) + 1)} | {n + 1})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def binned(loss_by_position: list, bins: list[tuple[int, int]]) -> np.ndarray:
    """Mean loss over each position range (positions are 1-based)."""
    loss = np.array([np.nan if x is None else x for x in loss_by_position], float)
    return np.array([np.nanmean(loss[a - 1:b - 1]) for a, b in bins])


def plot_loss_by_position(cells: dict[str, list[dict]], path: str, title: str) -> None:
    """Validation loss against token position on log x (the TTT-LM paper's figure): mean over
    seeds of the per-position loss averaged in log-spaced bins, ± sd over seeds shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, runs) in enumerate(cells.items()):
        curves = [r["loss_by_position"] for r in runs if r.get("loss_by_position")]
        if not curves:
            continue
        bins = log_bins(min(len(c) for c in curves), per_octave=6)
        ys = np.array([binned(c, bins) for c in curves])
        x = np.array([math.sqrt(a * (b - 1)) if b - 1 > a else a for a, b in bins])
        sd = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(bins))
        _band(ax, x, ys.mean(0), sd, f"{name} (n={len(curves)})", f"C{i % 10}")
    ax.set_xscale("log")
    ax.set(xlabel="token position in the context", ylabel="validation loss (nats/byte)",
           title=wrap(title))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=100)
    plt.close(fig)


def plot_vision(cells: dict[str, list[dict]], acc_path: str, inner_path: str) -> None:
    """Accuracy (mean ± sd) against MTTT inner steps T, and the inner loss over training."""
    plt = _plt()
    mttt = sorted([runs for runs in cells.values() if runs[0]["T"] is not None],
                  key=lambda runs: runs[0]["T"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = [runs[0]["T"] for runs in mttt]
    accs = [[r["eval_accuracy"] for r in runs] for runs in mttt]
    ax.errorbar(ts, [np.mean(a) for a in accs],
                yerr=[np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in accs], marker="o",
                capsize=3)
    ax.set(xlabel="inner steps T", ylabel="validation accuracy", title="Accuracy vs T")
    ax.set_xticks(ts)
    fig.tight_layout()
    save_figure_atomic(fig, acc_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, runs in enumerate(mttt):
        inner = runs[0].get("inner") or {}  # the first seed's curves
        if not inner:
            continue
        t_last = max(inner)
        T = runs[0]["T"]
        ax.plot(*inner[t_last], color=f"C{i}", label=f"T={T}: after {t_last} inner steps")
        if t_last:
            ax.plot(*inner[0], color=f"C{i}", ls="--", alpha=0.6, label=f"T={T}: at W0")
    ax.set(xlabel="outer training step", ylabel="inner reconstruction loss (layer mean)",
           title="Inner loss over training (first seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, inner_path, dpi=100)
    plt.close(fig)
