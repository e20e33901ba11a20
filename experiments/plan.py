"""The plan of a comparison, from its workdir's files: which runs a cell has now (a sweep's other
seeds wait for its best rate), which finished, the sweep's best rate, whether a run can start,
the runs the report aggregates, and the runs trained with other settings than a command plans.
"""

from __future__ import annotations

import math
import os

from experiments.grid import Cell, Run, run_overrides, source_dir
from experiments.specs import load_config
from ttt import files


def read_json(path: str) -> dict:
    """A JSON file's dict; {} when the file does not exist or is cut off (its run is redone:
    training resumes from its checkpoints)."""
    return files.read_json(path) or {}


def finished(run: Run, workdir: str) -> dict | None:
    """run.json of a finished run, else None (also for a cut-off one)."""
    return files.read_json(os.path.join(workdir, run.key, "run.json"))


def best_lr(cell: Cell, workdir: str) -> float | None:
    """The sweep's best learning rate once every sweep run of `cell` finished, else None:
    highest accuracy for MQAR, lowest validation loss otherwise; diverged runs rank last."""
    # here, not at the top: experiments.report imports numpy, whose BLAS thread would start
    # unpinned in a worker (it imports this module before scheduler._pin pins it to a core)
    from experiments.report import read_metrics

    scores = []
    for lr in cell.lrs:
        run = Run(cell, cell.seeds[0], lr)
        info = finished(run, workdir)
        if info is None:
            return None
        evals = [r for r in read_metrics(os.path.join(workdir, run.key)) if "eval/loss" in r]
        if info.get("diverged") or not evals:
            scores.append((-math.inf, lr))
            continue
        last = evals[-1]
        score = last["eval/accuracy"] if cell.group == "mqar" else -last["eval/loss"]
        loss = last["eval/loss"]
        scores.append((score if math.isfinite(loss) else -math.inf, lr))
    return max(scores, key=lambda s: (s[0], -s[1]))[1]  # ties: the smaller rate


def expand(cell: Cell, workdir: str) -> tuple[list[Run], bool]:
    """(runs of the cell known now, whether all of them are known): the sweep runs and, once
    the sweep has finished, the other seeds at the best rate."""
    if not cell.lrs:
        return [Run(cell, s) for s in cell.seeds], True
    runs = [Run(cell, cell.seeds[0], lr) for lr in cell.lrs]
    best = best_lr(cell, workdir)
    if best is None:
        return runs, False
    return runs + [Run(cell, s, best) for s in cell.seeds[1:]], True


# The train settings that change a run's result (the others: logging, checkpoints, placement).
RESULT_TRAIN_KEYS = ("steps", "global_batch_size", "grad_accum", "seed", "eval_every",
                     "eval_steps", "label_smoothing", "mixup_alpha", "stop_at")


def _result_settings(config: dict) -> dict:
    return {**{k: config.get(k) or {} for k in ("model", "data", "optim", "init")},
            "train": {k: (config.get("train") or {}).get(k) for k in RESULT_TRAIN_KEYS}}


def stale(cells: list[Cell], args) -> str | None:
    """A line naming the runs of `cells` in the workdir (finished or interrupted) that were
    trained with other settings than this command plans (another preset's, or before a
    `--set`), else None: they would be reused or resumed as they are, so the command stops
    instead of mixing them into the report."""
    # here, not at the top: ttt.train imports JAX, which --help and argument errors do without
    from ttt.train.workdir import run_differences

    sections = ("model", "data", "optim", "init", "train")
    found = []
    for cell in cells:
        for run in expand(cell, args.workdir)[0]:
            saved = read_json(os.path.join(args.workdir, run.key, "config.json"))
            if not saved:
                continue
            planned = load_config(run.cell.spec, run_overrides(run, args.workdir,
                                                               args.overrides)).to_dict()
            diffs = run_differences(_result_settings(saved), _result_settings(planned), sections)
            if diffs:
                found.append((run.key, diffs))
    if not found:
        return None
    key, diffs = found[0]
    return (f"{len(found)} run(s) in {args.workdir} were trained with other settings "
            f"than this command's, e.g. {key} ({'; '.join(diffs[:3])}): pass --force to train "
            f"their cells again, or another --workdir")


def ready(run: Run, workdir: str) -> bool:
    """Whether a run can start: its Transformer (init_from) has finished."""
    if not run.cell.init_from:
        return True
    info_path = os.path.join(source_dir(run, workdir), "run.json")
    return os.path.exists(info_path)


def selected(cell: Cell, workdir: str) -> list[Run]:
    """The runs the report aggregates for a cell: every seed at the chosen rate."""
    if not cell.lrs:
        return [Run(cell, s) for s in cell.seeds]
    best = best_lr(cell, workdir)
    return [] if best is None else [Run(cell, s, best) for s in cell.seeds]
