r"""The long-context probe: loss on copied spans by copy distance, against the loss on own text.

  python -m ttt.main --config experiments/lm.py:softmax,cpu,repeats,ctx=256 --workdir runs/sm \
      --config.model.pre_conv=True --config.train.steps=800 --config.train.global_batch_size=16 \
      --config.optim.lr=0.01     # ~3.5 min on 2 CPU cores; docs/results.md has the measured table
  python -m experiments.long_context --workdir runs/sm [--max_batches=M] [--skip=1] [--out=DIR]
  python -m experiments.long_context --workdir runs/sm runs/gdn runs/swa   # + a markdown table

Loads a trained LM (`ttt.run.load`), runs it over the validation split of its data with copied
spans (`ttt.data.repeats`: the run's own `data.repeats` settings, or the `repeats` token's defaults
for a run trained on plain text) and writes `WORKDIR/eval/long_context.json` (whole or not at
all): the mean loss on copied tokens in octave bins of copy distance (16-32, 32-64, ... up to
seq_len) and on the same tokens at their sources (their first occurrence in the window, after as
many tokens of the span: the paired baseline), on the window's own text (which also holds each
window's first tokens and the tokens right after a copy ends, so it is not the baseline), on the
first `--skip` tokens of each copy (nothing before them says a copy has begun) and by place in the
copy. A model that uses the context D tokens back predicts copies at distance D far better than
their sources; one that forgets beyond some horizon loses that advantage in the bins past it.
The same seed gives every run the same validation windows, so runs of different mixers are scored
on identical tokens. A few lines per run on stdout; with several runs one markdown table too.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ttt import cli
from ttt.errors import ResourceError
from ttt.files import check_writable, write_json_atomic


def repeats_data_config(data_config):
    """The run's data config with copied spans: its own, else the `repeats` token's defaults."""
    from experiments.lm import REPEATS  # here: lm imports the layers (JAX) (see probe_run)

    cfg = data_config.copy_and_resolve_references()
    if not cfg.get("repeats"):
        with cfg.unlocked():
            cfg.update(repeats=REPEATS["fraction"], repeat_span=REPEATS["span"],
                       repeat_min_distance=REPEATS["min_distance"],
                       repeat_max_distance=int(cfg.seq_len))
    return cfg


def _token_nll(model, mult):
    """jit(params, inputs, targets) -> (B, N) loss of every target token."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def nll(params, inputs, targets):
        logits, _ = model.apply({"params": params}, inputs, ttt_lr_mult=mult)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # (B, N, V)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, N)

    return nll


def probe_run(workdir: str, *, batch_size: int | None = None, max_batches: int | None = None,
              skip: int = 1, step: int | None = None) -> dict:
    """Score the run in `workdir` on copied spans (see the module doc); returns the JSON dict."""
    # imported here: the command line answers --help and bad flags before JAX starts
    import jax

    from ttt.data import make_dataset
    from ttt.data import repeats as repeats_lib
    from ttt.data.pipeline import repeat_settings
    from ttt.run import load
    from ttt.train import optim

    for name, value in (("batch_size", batch_size), ("max_batches", max_batches)):
        if value is not None and value < 1:
            raise cli.UsageError(f"--{name}={value}: must be at least 1")
    if skip < 0:
        raise cli.UsageError(f"--skip={skip}: must be at least 0")
    run = load(workdir, step)
    config = run.config
    if config.model.kind != "lm":
        raise cli.UsageError(f"{workdir} is a {config.model.kind} run: the probe needs an LM")
    try:
        data_config = repeats_data_config(config.data)
        rep = repeat_settings(data_config)
        rows = batch_size or int(config.train.global_batch_size)
        dataset = make_dataset(data_config, "validation", rows, seed=int(config.train.seed))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise cli.UsageError(f"validation data of {workdir}: {cli.one_line(err)}") from None
    if skip >= rep.span:
        raise cli.UsageError(f"--skip={skip}: must be below the copies' span {rep.span}")
    edges = repeats_lib.distance_edges(rep, int(data_config.seq_len))
    nll_fn = _token_nll(run.model, float(optim.ttt_lr_mult_schedule(config.optim)(run.step)))
    totals: dict = {}
    batches = 0
    for batch in dataset.iterator():
        if max_batches is not None and batches >= max_batches:
            break
        nll = np.asarray(jax.device_get(nll_fn(run.params, batch["inputs"], batch["targets"])))
        part = repeats_lib.sums(nll, batch["mask"], batch["repeat_distance"],
                                batch["repeat_offset"], edges, rep.span, skip)
        totals = {k: totals.get(k, 0.0) + v for k, v in part.items()}
        batches += 1
    if not batches:
        raise cli.UsageError(f"the validation split of {workdir} holds no batch")
    return {"workdir": os.path.abspath(workdir), "mixer": config.model.mixer, "step": run.step,
            "seq_len": int(data_config.seq_len), "batches": batches, "batch_size": rows,
            "skip": skip, "repeats": rep._asdict(), **repeats_lib.summarize(totals, edges)}


def table(result: dict) -> str:
    """The result as a few text lines: loss per distance bin, own text and skipped tokens."""
    def fmt(x):
        return "   -  " if x is None else f"{x:6.3f}"

    head = " ".join(f"{b['from']:>4}-{b['to']:<4}" for b in result["by_distance"])
    vals = " ".join(f"{fmt(b['loss']):>9}" for b in result["by_distance"])
    source = " ".join(f"{fmt(b['source_loss']):>9}" for b in result["by_distance"])
    return (f"{result['mixer']} step {result['step']}: own text {fmt(result['own_loss'])}, "
            f"first {result['skip']} of each copy {fmt(result['skipped_loss'])}, copies "
            f"{fmt(result['copied_loss'])} (at their sources {fmt(result['source_loss'])}; "
            f"{result['copied_tokens']:,} tokens)\n"
            f"  distance {head}\n  copy     {vals}\n  source   {source}")


def markdown(results: list[dict]) -> str:
    """One row per run: mixer, step, own-text loss, first tokens of copies, then the loss on
    copies (and on the same tokens at their sources) in all and by distance."""
    edges = [f"{b['from']}–{b['to'] - 1}" for b in results[0]["by_distance"]]
    lines = ["| mixer | step | own text | first {} of a copy | copies (sources) | {} |".format(
        results[0]["skip"], " | ".join(edges)), "|---" * (4 + len(edges)) + "|---|"]

    def f(x):
        return "–" if x is None else f"{x:.3f}"

    for r in results:
        cells = [r["mixer"], str(r["step"]), f(r["own_loss"]), f(r["skipped_loss"]),
                 f"{f(r['copied_loss'])} ({f(r['source_loss'])})"] + [
                     f"{f(b['loss'])} ({f(b['source_loss'])})" for b in r["by_distance"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.long_context",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", nargs="+", required=True,
                        help="run directories of LMs written by python -m ttt.main")
    parser.add_argument("--batch_size", type=int, help="windows per batch (default: the run's)")
    parser.add_argument("--max_batches", type=int, help="stop after this many batches "
                                                        "(default: the whole split)")
    parser.add_argument("--skip", type=int, default=1,
                        help="leading tokens of each copy left out of the distance bins")
    parser.add_argument("--step", type=int, help="checkpoint step to load (default: newest)")
    parser.add_argument("--out", help="directory for long_context.json (default: WORKDIR/eval; "
                                      "one --workdir only)")
    parser.add_argument("--debug", action="store_true", help="tracebacks for errors")
    args = parser.parse_args(argv)
    if args.out and len(args.workdir) > 1:
        raise cli.UsageError("--out takes one --workdir: each run writes its own result")
    results = [_probe_one(w, vars(args)) for w in args.workdir]
    if len(results) > 1:
        print(markdown(results))
    return 0


def _probe_one(workdir: str, values: dict) -> dict:
    out_dir = values["out"] or os.path.join(workdir, "eval")
    if values["out"] or os.path.isfile(os.path.join(workdir, "config.json")):
        try:
            check_writable(out_dir)
        except OSError as err:
            raise cli.UsageError(f"cannot write to {out_dir} ({err.strerror or err}); pass "
                                 "--out=DIR with a writable directory") from None
    result = probe_run(workdir, **{k: values[k] for k in ("batch_size", "max_batches", "skip",
                                                          "step")})
    path = os.path.join(out_dir, "long_context.json")
    try:
        write_json_atomic(path, result, indent=1)
    except OSError as err:
        raise ResourceError(f"writing {path} failed ({err.strerror or err}); make room or pass "
                            "--out=DIR") from None
    print(table(result))
    print(f"wrote {path}")
    return result


def main(argv=None) -> int:
    """The `python -m experiments.long_context` entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
