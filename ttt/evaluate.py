r"""Evaluate a trained run on a whole split, with the loss averaged by token position.

  python -m ttt.evaluate --workdir=/tmp/lm [--split=validation] [--seq_len=N] [--batch_size=B]
      [--max_batches=M] [--step=S] [--out=DIR]

Writes `<NAME>.json` into `WORKDIR/eval` (or --out) — loss, perplexity (LMs), accuracy, the number
of tokens (or images) scored, and for LMs `loss_by_position`: the mean loss of the token at each
position 1..seq_len over every window of the split — and `<NAME>_loss_by_position.png`, the TTT-LM
paper's view of whether a layer keeps using a longer context (a falling curve: later tokens are
predicted better because more context is used). NAME is the split and every setting that changes
the result (`result_name`): validation, validation_seq1024, validation_max2_b8, test_step200, ...,
so a partial or other-length evaluation never replaces a whole-split one. `--seq_len` evaluates at
another context length than the run trained at. The validation / test splits are read once, whole
(padding counts zero); the endless train split needs --max_batches. The output directory is
checked writable before anything is evaluated; both files are written whole or not at all
(`ttt.files`). One summary line on stdout.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ttt import cli
from ttt.errors import ResourceError
from ttt.files import check_writable, read_json, save_figure_atomic, write_json_atomic

FLAGS = (
    cli.Flag("workdir", str, None, "a run directory written by python -m ttt.main", True),
    cli.Flag("split", str, "validation", "validation, test or train"),
    cli.Flag("seq_len", int, None, "context length to evaluate at (default: the run's)"),
    cli.Flag("batch_size", int, None, "windows per batch (default: the run's global batch)"),
    cli.Flag("max_batches", int, None, "stop after this many batches (default: the whole split)"),
    cli.Flag("step", int, None, "checkpoint step to load (default: the newest)"),
    cli.Flag("out", str, None, "directory for the result files (default: WORKDIR/eval)"),
    cli.DEBUG,
)


def result_name(split: str = "validation", *, seq_len: int | None = None,
                batch_size: int | None = None, max_batches: int | None = None,
                step: int | None = None) -> str:
    """The file stem of an evaluation: the split and each setting given that changes the result
    ('validation', 'validation_seq1024', 'validation_max2_b8', 'test_step200'). The batch size only
    matters with --max_batches (a whole split scores every window whatever the batch)."""
    name = split
    if seq_len is not None:
        name += f"_seq{seq_len}"
    if max_batches is not None:
        name += f"_max{max_batches}" + (f"_b{batch_size}" if batch_size is not None else "")
    if step is not None:
        name += f"_step{step}"
    return name


def read_result(path: str) -> dict | None:
    """An evaluation written by this module, or None when `path` is missing, cut off or lacks
    its fields (the caller evaluates again)."""
    result = read_json(path)
    if result is None or not isinstance(result.get("loss"), (int, float)):
        return None
    by_pos = result.get("loss_by_position")
    if by_pos is not None and (not isinstance(by_pos, list) or not by_pos or len(by_pos) !=
                               result.get("seq_len", len(by_pos))):
        return None
    return result


def _lm_sums(model, mult):
    """jit(params, batch) -> per-position sums over the batch: loss (N,), count (N,), correct ()."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def sums(params, batch):
        logits, _ = model.apply({"params": params}, batch["inputs"], ttt_lr_mult=mult)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # (B, N, V)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # (B, N)
        mask = batch["mask"].astype(jnp.float32)  # (B, N)
        hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
        return {"loss": jnp.sum(nll * mask, 0), "count": jnp.sum(mask, 0),
                "correct": jnp.sum(hit * mask)}

    return sums


def evaluate_run(workdir: str, split: str = "validation", *, seq_len: int | None = None,
                 batch_size: int | None = None, max_batches: int | None = None,
                 step: int | None = None) -> dict:
    """Evaluate the run in `workdir` (see the module doc); returns what eval/<NAME>.json holds."""
    # imported here: the command line answers --help and bad flags before JAX starts
    import jax

    from ttt.data import make_dataset
    from ttt.run import load
    from ttt.train import optim, steps

    if split not in ("validation", "test", "train"):
        raise cli.UsageError(f"--split={split}: use validation, test or train")
    if split == "train" and max_batches is None:
        raise cli.UsageError("--split=train repeats forever: give --max_batches")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                        ("max_batches", max_batches)):
        if value is not None and value < 1:
            raise cli.UsageError(f"--{name}={value}: must be at least 1")
    run = load(workdir, step)
    config = run.config
    data_config = config.data.copy_and_resolve_references()
    if seq_len is not None:
        if config.model.kind != "lm":
            raise cli.UsageError(f"--seq_len: {workdir} is a {config.model.kind} run, not an LM")
        with data_config.unlocked():
            data_config.seq_len = seq_len
            if data_config.get("test_seq_len"):
                data_config.test_seq_len = seq_len
    rows = batch_size or int(config.train.global_batch_size)
    try:
        dataset = make_dataset(data_config, split, rows, seed=int(config.train.seed))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise cli.UsageError(f"--split={split} of {workdir}: {cli.one_line(err)}") from None
    mult = float(optim.ttt_lr_mult_schedule(config.optim)(run.step))
    lm = config.model.kind == "lm"
    if lm:
        fn = _lm_sums(run.model, mult)
    else:
        task = steps.make_task(config, run.model)
        fn = jax.jit(lambda p, b: steps.eval_step(p, b, mult, task=task))
    totals: dict[str, np.ndarray | float] = {}
    batches = 0
    for batch in dataset.iterator():
        if max_batches is not None and batches >= max_batches:
            break
        out = jax.device_get(fn(run.params, batch))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        batches += 1
    if not batches:
        raise cli.UsageError(f"--split={split} of {workdir} holds no batch")
    result = {"workdir": os.path.abspath(workdir), "split": split, "step": run.step,
              "batches": batches, "batch_size": rows}
    if lm:
        count = float(np.sum(totals["count"]))
        loss = float(np.sum(totals["loss"])) / max(count, 1e-9)
        by_pos = np.where(totals["count"] > 0, totals["loss"] / np.maximum(totals["count"], 1),
                          np.nan)
        result.update(seq_len=int(len(by_pos)), tokens=int(count), loss=loss,
                      perplexity=float(np.exp(min(loss, 80.0))),
                      accuracy=float(totals["correct"]) / max(count, 1e-9),
                      loss_by_position=[None if np.isnan(x) else float(x) for x in by_pos],
                      tokens_by_position=[int(x) for x in totals["count"]])
    else:
        count = float(totals["weight"])
        result.update(images=int(count), loss=float(totals["loss_sum"]) / max(count, 1e-9),
                      accuracy=float(totals["correct"]) / max(count, 1e-9))
    return result


def plot_loss_by_position(result: dict, path: str, title: str) -> None:
    """Mean loss against token position (log x), raw and smoothed over a window of ~N/32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.array([np.nan if x is None else x for x in result["loss_by_position"]])
    pos = np.arange(1, len(loss) + 1)
    width = max(1, len(loss) // 32)
    smooth = np.convolve(np.nan_to_num(loss), np.ones(width) / width, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(pos, loss, lw=0.6, alpha=0.4, label="per position")
    ax.plot(pos[width - 1:], smooth, lw=1.6, label=f"mean over {width} positions")
    ax.set_xscale("log")
    ax.set_xlabel("token position in the window")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def _main(argv: list[str]) -> int:
    values, _ = cli.parse_flags(argv, FLAGS, prog="python -m ttt.evaluate", doc=__doc__)
    workdir = values["workdir"]
    settings = {k: values[k] for k in ("seq_len", "batch_size", "max_batches", "step")}
    name = result_name(values["split"], **settings)
    out_dir = values["out"] or os.path.join(workdir, "eval")
    is_run = os.path.isfile(os.path.join(workdir, "config.json"))  # else evaluate_run says so
    if values["out"] or is_run:
        try:
            check_writable(out_dir)
        except OSError as err:
            raise cli.UsageError(f"cannot write to {out_dir} ({err.strerror or err}); pass "
                                 "--out=DIR with a writable directory") from None
    result = evaluate_run(workdir, values["split"], **settings)
    json_path = os.path.join(out_dir, f"{name}.json")
    png = os.path.join(out_dir, f"{name}_loss_by_position.png")
    try:
        write_json_atomic(json_path, result, indent=1)
        if "loss_by_position" in result:
            from ttt.train.workdir import read_config  # (see evaluate_run)

            mixer = read_config(workdir).model.mixer
            plot_loss_by_position(result, png, f"{mixer}, {values['split']} split, step "
                                  f"{result['step']}, {result['tokens']:,} tokens")
    except OSError as err:
        raise ResourceError(f"writing {err.filename or out_dir} failed ({err.strerror or err}); "
                            "a file not written keeps its old contents: make room or pass --out=DIR"
                            ) from None
    written = [json_path]
    if "loss_by_position" in result:
        written.append(png)
        summary = (f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.4g}, accuracy "
                   f"{result['accuracy']:.4f} over {result['tokens']:,} tokens "
                   f"(windows of {result['seq_len']})")
    else:
        summary = (f"loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f} over "
                   f"{result['images']:,} images")
    print(f"{workdir} step {result['step']}, {values['split']}: {summary}; wrote "
          f"{', '.join(written)}")
    return 0


def main(argv=None) -> int:
    """The `python -m ttt.evaluate` entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
