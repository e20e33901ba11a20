"""Summaries of finished runs and the comparison report (markdown tables + PNG plots).

Everything here reads only what a run leaves in its workdir — `config.json` (the resolved config
the trainer writes) and `metrics.jsonl` (one JSON line per logged step) — plus `run.json` when the
run was launched by `experiments.compare` (its name, group and wall time). So a run started by
hand with `python -m ttt.main` can join a report too.

Groups, by what the config trains:
  lm      language model on text: params, state size, validation loss, bits per byte, tokens/s
  mqar    MQAR: accuracy on the answer positions against state size per layer
  ladder  the TTT-LM ablation ladder (configs with a `rung` key): validation loss per rung
  vision  ViT classifiers: accuracy against MTTT inner steps T, inner loss over training
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable

GROUPS = ("lm", "mqar", "ladder", "vision")


# ----------------------------------------------------------------------------- reading a run


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl` in order ({"step": int, "<name>": float, ...})."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def group_of(config: dict) -> str:
    """Which table a run belongs in (see the module docstring)."""
    if config["model"]["kind"] == "vit":
        return "vision"
    if "rung" in config:
        return "ladder"
    return "mqar" if config["data"]["name"] == "mqar" else "lm"


def _dims(model: dict) -> tuple[int, int, int]:
    """(layers, width C, heads H) of a resolved model config."""
    from ttt.models import PRESETS

    preset = dict(PRESETS[model["kind"]][model["preset"]])
    pick = lambda k: model.get(k) if model.get(k) is not None else preset[k]  # noqa: E731
    return pick("num_layers"), pick("width"), pick("num_heads")


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
    weights, linear attention's S (+ s), softmax's KV cache of the whole sequence)."""
    from ttt.layers import state_size as registry_state_size
    from ttt.models import model_mixer

    model = config["model"]
    _, C, H = _dims(model)
    name = model_mixer(model["kind"], model["mixer"])
    return registry_state_size(name, C, H, _tokens(config), **(model.get("mixer_kwargs") or {}))


def param_count(config: dict) -> int:
    """Parameters of the model, counted on abstract shapes (nothing is allocated)."""
    import jax
    import jax.numpy as jnp
    import ml_collections as mlc

    from ttt.models import build_model
    from ttt.models import param_count as count

    model_cfg = mlc.ConfigDict(config["model"])
    model = build_model(model_cfg)
    if config["model"]["kind"] == "lm":
        x = jax.ShapeDtypeStruct((1, int(config["data"]["seq_len"])), jnp.int32)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape,
                                                                                     x.dtype)))
    else:
        s, c = int(model_cfg.image_size), int(model_cfg.channels)
        shapes = jax.eval_shape(lambda: model.init(
            {"params": jax.random.PRNGKey(0), "inner": jax.random.PRNGKey(1)},
            jnp.zeros((1, s, s, c), jnp.float32), train=False))
    return count(shapes)


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


def summarize(run_dir: str) -> dict:
    """One run's row of the report, from its workdir's files."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    info = {}
    if os.path.exists(os.path.join(run_dir, "run.json")):
        with open(os.path.join(run_dir, "run.json")) as f:
            info = json.load(f)
    rows = read_metrics(run_dir)
    group = info.get("group") or group_of(config)
    unit = "images" if config["model"]["kind"] == "vit" else "tokens"
    _, rates = _series(rows, f"train/{unit}_per_s")
    evals = [r for r in rows if "eval/loss" in r]
    last = evals[-1] if evals else {}
    kw = config["model"].get("mixer_kwargs") or {}
    out = {
        "name": info.get("name") or os.path.basename(os.path.normpath(run_dir)),
        "group": group, "dir": run_dir, "spec": info.get("spec", ""),
        "mixer": config["model"]["mixer"], "mixer_kwargs": kw,
        "params": param_count(config), "state": state_size(config),
        "seq_len": config["data"].get("seq_len"), "steps": rows[-1]["step"] if rows else 0,
        "eval_loss": last.get("eval/loss", math.nan),
        "eval_accuracy": last.get("eval/accuracy", math.nan),
        # the first logged rate includes compilation, so it is left out
        "throughput": statistics.median(rates[1:]) if len(rates) > 1 else
        (rates[0] if rates else math.nan),
        "unit": unit, "wall_s": info.get("wall_s", math.nan),
        "train_curve": _series(rows, "train/loss"),
    }
    if group == "mqar":
        out.update(num_kv_pairs=config["data"].get("num_kv_pairs"),
                   width=_dims(config["model"])[1])
    if group == "ladder":
        out.update(rung=config["rung"], paper_perplexity=config.get("paper_perplexity"))
    if group == "vision":
        from ttt.layers import mixer_spec

        spec = mixer_spec(config["model"]["mixer"])
        out.update(T=spec.attrs(**kw)["steps"] if "steps" in spec.accepted() else None,
                   inner=_inner_curves(rows))
    return out


# ----------------------------------------------------------------------------- tables


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def lm_table(runs: list[dict]) -> str:
    """Language models: params, state, validation loss, bits per byte, accuracy, throughput."""
    return _table(
        ["variant", "mixer", "params", "state floats/layer", "val loss", "bits/byte",
         "val acc", "tokens/s", "wall s"],
        [[r["name"], r["mixer"], f"{r['params']:,}", f"{r['state']:,}", _fmt(r["eval_loss"]),
          _fmt(r["eval_loss"] / math.log(2)), _fmt(r["eval_accuracy"], ".3f"),
          _fmt(r["throughput"], ",.0f"), _fmt(r["wall_s"], ".0f")] for r in runs])


def mqar_table(runs: list[dict]) -> str:
    """MQAR: accuracy on answer positions per (mixer, length, pairs, width) with state size."""
    runs = sorted(runs, key=lambda r: (r["mixer"], r["seq_len"], r["num_kv_pairs"], r["width"]))
    return _table(
        ["mixer", "seq len", "kv pairs", "width", "state floats/layer", "accuracy", "steps",
         "wall s"],
        [[r["mixer"], str(r["seq_len"]), str(r["num_kv_pairs"]), str(r["width"]),
          f"{r['state']:,}", _fmt(r["eval_accuracy"], ".3f"), str(r["steps"]),
          _fmt(r["wall_s"], ".0f")] for r in runs])


def ladder_table(runs: list[dict]) -> str:
    """Ablation ladder: validation loss and perplexity per rung, change from the previous rung."""
    from experiments.ablation import RUNGS

    runs = sorted(runs, key=lambda r: RUNGS.index(r["rung"]) if r["rung"] in RUNGS else 99)
    rows, prev = [], None
    for i, r in enumerate(runs):
        delta = "—" if prev is None else f"{r['eval_loss'] - prev:+.4f}"
        rows.append([str(i + 1), r["rung"], r["mixer"], f"{r['params']:,}", _fmt(r["eval_loss"]),
                     _fmt(math.exp(min(r["eval_loss"], 80))), delta,
                     _fmt(r.get("paper_perplexity"), ".2f")])
        prev = r["eval_loss"]
    return _table(["#", "rung", "mixer", "params", "val loss", "val ppl", "Δ loss",
                   "paper ppl (125M, Pile 2k)"], rows)


def vision_table(runs: list[dict]) -> str:
    """Vision: accuracy per MTTT inner-step count T and the inner loss before/after T steps."""
    runs = sorted(runs, key=lambda r: (r["T"] is None, r["T"] or 0, r["name"]))
    rows = []
    for r in runs:
        inner = r.get("inner") or {}
        t_last = max(inner) if inner else None
        before = inner[0][1][-1] if inner else math.nan
        after = inner[t_last][1][-1] if inner else math.nan
        rows.append([r["name"], r["mixer"], _fmt(r["T"], "d"), f"{r['params']:,}",
                     _fmt(r["eval_accuracy"], ".3f"), _fmt(r["eval_loss"]), _fmt(before),
                     _fmt(after), _fmt(r["throughput"], ",.0f"), _fmt(r["wall_s"], ".0f")])
    return _table(["variant", "mixer", "T", "params", "val acc", "val loss",
                   "inner loss W0 (end)", "inner loss W_T (end)", "images/s", "wall s"], rows)


TABLES = {"lm": ("Language model (embedded corpus, bytes)", lm_table),
          "mqar": ("MQAR (accuracy on answer positions)", mqar_table),
          "ladder": ("TTT-LM ablation ladder", ladder_table),
          "vision": ("MTTT vision (embedded digits)", vision_table)}


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(runs: list[dict], path: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        steps, loss = r["train_curve"]
        ax.plot(steps, loss, label=r["name"])
    ax.set(xlabel="training step", ylabel="training loss (nats/token)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_mqar(runs: list[dict], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    markers = dict(zip(sorted({(r["seq_len"], r["num_kv_pairs"]) for r in runs}), "osD^v<>",
                       strict=False))
    colors = {}
    for r in runs:
        color = colors.setdefault(r["mixer"], f"C{len(colors)}")
        key = (r["seq_len"], r["num_kv_pairs"])
        ax.scatter(r["state"], r["eval_accuracy"], color=color, marker=markers[key], s=40)
    for m, c in colors.items():
        ax.scatter([], [], color=c, label=m)
    for (n, kv), mk in markers.items():
        ax.scatter([], [], color="gray", marker=mk, label=f"N={n}, pairs={kv}")
    ax.set_xscale("log")
    ax.set(xlabel="state size (floats per layer per sequence)", ylabel="MQAR accuracy",
           title="MQAR accuracy vs state size", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_vision(runs: list[dict], acc_path: str, inner_path: str) -> None:
    plt = _plt()
    mttt = sorted([r for r in runs if r["T"] is not None], key=lambda r: r["T"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["T"] for r in mttt], [r["eval_accuracy"] for r in mttt], "o-")
    ax.set(xlabel="inner steps T", ylabel="validation accuracy", title="Accuracy vs T")
    ax.set_xticks([r["T"] for r in mttt])
    fig.tight_layout()
    fig.savefig(acc_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(mttt):
        inner = r.get("inner") or {}
        if not inner:
            continue
        t_last = max(inner)
        ax.plot(*inner[t_last], color=f"C{i}", label=f"T={r['T']}: after {t_last} inner steps")
        if t_last:
            ax.plot(*inner[0], color=f"C{i}", ls="--", alpha=0.6, label=f"T={r['T']}: at W0")
    ax.set(xlabel="outer training step", ylabel="inner reconstruction loss (layer mean)",
           title="Inner loss over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(inner_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- the report


def build_report(summaries: list[dict], out_dir: str, *, header: str = "") -> str:
    """Write `out_dir/report.md` and the PNG plots; return the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    by_group: dict[str, list[dict]] = {}
    for s in summaries:
        by_group.setdefault(s["group"], []).append(s)
    parts = ["# Comparison report", header.strip()] if header else ["# Comparison report"]
    for group in GROUPS:
        runs = by_group.get(group)
        if not runs:
            continue
        title, table = TABLES[group]
        parts += [f"## {title}", table(runs)]
        if group in ("lm", "ladder"):
            png = f"{group}_loss.png"
            plot_loss_curves(runs, os.path.join(out_dir, png), title)
            parts.append(f"![{title}]({png})")
        elif group == "mqar":
            plot_mqar(runs, os.path.join(out_dir, "mqar_accuracy_vs_state.png"))
            parts.append("![MQAR accuracy vs state size](mqar_accuracy_vs_state.png)")
        else:
            plot_vision(runs, os.path.join(out_dir, "vision_accuracy_vs_T.png"),
                        os.path.join(out_dir, "vision_inner_loss.png"))
            parts += ["![accuracy vs T](vision_accuracy_vs_T.png)",
                      "![inner loss over training](vision_inner_loss.png)"]
    text = "\n\n".join(parts) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text
