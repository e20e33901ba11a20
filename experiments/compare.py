r"""Train the cells of a comparison (every seed, after a learning-rate sweep) and build one report.

  python -m experiments.compare --preset demo --workdir runs/demo        # `make demo` (~16 min)
  python -m experiments.compare --preset compare --workdir runs/compare  # `make compare` (~3 h)
  python -m experiments.compare --preset compare --only lm --workdir runs/mine \
      --set data.name=text_files --set "data.paths=['~/my_texts']"       # long context, own text
  python -m experiments.compare --workdir runs/mine --seeds 0,1,2 \
      --configs experiments/lm.py:ttt_linear,cpu experiments/lm.py:softmax,cpu  # your variants
  python -m experiments.compare --workdir runs/report --runs runs/a runs/b  # report only

A preset is a list of `Cell`s: one config (`experiments/<file>.py:<arg>` plus overrides) trained
once per seed. A cell with `lrs` first trains its first seed at every learning rate of the sweep,
picks the best (accuracy for MQAR, validation loss otherwise; a diverged run is the worst), and
trains its other seeds at that rate (Zoology's protocol: report the best rate per mixer). A cell
with `init_from` starts each seed from the finished run of the same seed of another cell (a
trained softmax-attention LM: `config.init.transformer_workdir`). A cell with `by_position`
evaluates each finished run on the whole validation split with the loss averaged by token position
(`ttt.evaluate.evaluate_run`, written to `RUN/eval/validation.json`).

Configs load exactly as `python -m ttt.main --config=<spec> --config.<key>=<value>` loads them
(`ttt.cli`; `--set key=value` is the typed `--config.key=value`, applied to every run); a bad spec
or override stops everything before training, in one line (exit status 2). Each run trains in
`WORKDIR/<group>/<cell>/<lr..._>s<seed>` through `ttt.train.train_and_evaluate` (the driver of
`python -m ttt.main`). A run whose `run.json` exists is finished and is not trained again
(--force deletes the cells' runs first); an interrupted one (Ctrl-C or SIGTERM: every worker
saves a checkpoint) resumes from its checkpoint, so rerunning the same command continues a
comparison where it stopped. A run in the workdir trained with other settings than the command
plans (another preset's, an earlier `--set`) stops it in one line before anything trains. Runs
are trained by `--jobs` worker processes (default one per CPU core, at most 2), each pinned to
its own core (tiny models train faster as parallel single-threaded runs than as one run split
over threads), in the order of the preset's cells:
the most informative first, so an interrupted comparison has finished those (`demo` lists the
longest first instead, to finish soonest). The report (`WORKDIR/report.md`, the
PNGs and `results.json`, see `experiments.report`) is built only from the runs' files.

Presets (runtimes measured on an idle 2-core machine, see README):
  demo     ~16 minutes. MQAR at the harness setting (N = 64, 8 pairs, width 64; linear
           attention and TTT-Linear at 1 seed, softmax at 3 seeds: the harness validated),
           long-context byte LMs (context 1k, 300 steps, 1 seed) with the loss by position,
           TTT-Linear from the trained Transformer vs from scratch, MTTT vision (T = 0, 2).
  compare  ~3 hours. MQAR at 8 and 16 pairs (LaCT at 8): a 2-rate sweep (1e-3, 3e-3) per mixer
           and pair count, then 3 seeds at the best rate; long-context LMs at 2k, 3 seeds
           each; TTT-Linear from the Transformer, 3 seeds; the ablation ladder and MTTT vision
           (T = 0, 1, 2, 4), 3 seeds.
  tiny     smoke runs that exercise every mechanism (seeds, sweep, init, by-position) in tests.
To add a mixer to the comparison (e.g. a new registry entry), add its name to MQAR_MIXERS and/or
COMPARE_LM_MIXERS below (LM_MIXERS: the demo's LMs too).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import sys
import threading
import time
import traceback

from ttt import cli
from ttt.config import ConfigError, with_defaults

# The mixers compared; a new registry entry joins every MQAR / LM cell by being listed here.
MQAR_MIXERS = ("linear_attention", "ttt_linear", "ttt_mlp", "lact", "softmax")
LM_MIXERS = ("linear_attention", "ttt_linear", "ttt_mlp", "softmax")
COMPARE_LM_MIXERS = (*LM_MIXERS, "lact")  # the demo's budget leaves the large-chunk layer out
LADDER = ("linear_attn", "linear_attn_plain", "ttt_equivalence", "learnable_W0", "ln_residual",
          "mini_batch", "learnable_eta", "mamba_backbone")

# MQAR, the harness setting: sequence length 64, width 64, 1,750 steps of 64 sequences
# (experiments/mqar.py, `harness`). The sweep is Zoology's per-mixer learning-rate search; the
# demo trains at 8 pairs at MQAR_BEST_LR, softmax at 3 seeds (the harness validated), the
# others at one, each at the rate the `compare` sweep picked (README): 3e-3 for every mixer but
# linear attention (1e-3: 0.258 vs 0.104 at 8 pairs, seed 0).
MQAR_PAIRS = (8, 16)
MQAR_LRS = (1e-3, 3e-3)  # 1e-2 was the worst rate for softmax and linear attention
MQAR_BEST_LR = {"linear_attention": 1e-3, "ttt_linear": 3e-3, "ttt_mlp": 3e-3, "softmax": 3e-3}
SEEDS = (0, 1, 2)
# The demo's MQAR leaves TTT-MLP out (its run alone would take a third of the demo's budget).
DEMO_MQAR_MIXERS = tuple(m for m in MQAR_MIXERS if m not in ("ttt_mlp", "lact"))
# Rough CPU seconds of one run on one idle core (measured; the pool starts the longest first so
# the last worker does not finish long after the others). Unlisted: 300 (MQAR), 200 (LM).
COST = {("mqar", "softmax"): 170, ("mqar", "linear_attention"): 200, ("mqar", "ttt_linear"): 280,
        ("mqar", "lact"): 800,  # estimated: 715 s on both cores (2026-11-30)
        ("mqar", "ttt_mlp"): 550, ("lm", "softmax"): 1100, ("lm", "ttt_mlp"): 200,
        ("lm", "ttt_linear"): 150, ("lm", "linear_attention"): 110, ("init", "ttt_linear"): 150}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One comparison cell: a config trained once per seed (see the module docstring)."""

    group: str  # report section: mqar, lm, init, ladder, vision
    name: str  # unique within the group
    spec: str  # experiments/<file>.py:<arg>
    overrides: tuple[str, ...] = ()  # key=value, as --set
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] = ()  # sweep on seeds[0], the other seeds at the best rate
    by_position: bool = False  # loss by token position on the validation split
    init_from: str | None = None  # "group/name" of the Transformer cell each seed starts from
    cost: float = 60.0  # rough CPU seconds of one run (scheduling only)
    rank: int = 0  # scheduling: lower ranks first, then seed by seed (see _order)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a cell: a seed, and a learning rate when the cell sweeps."""

    cell: Cell
    seed: int
    lr: float | None = None

    @property
    def key(self) -> str:
        tag = f"s{self.seed}" if self.lr is None else f"lr{self.lr:g}_s{self.seed}"
        return f"{self.cell.group}/{self.cell.name}/{tag}"


def _mqar_cells(pairs, seeds, lrs, mixers=MQAR_MIXERS, rank: int = 0) -> list[Cell]:
    """One cell per pair count and mixer, softmax first (it validates the harness)."""
    out = []
    for kv in pairs:
        for m in sorted(mixers, key=lambda m: m != "softmax"):
            fixed = () if lrs else (f"optim.lr={MQAR_BEST_LR.get(m, 3e-3)}",)
            out.append(Cell("mqar", f"{m}_kv{kv}", f"experiments/mqar.py:{m},harness,kv={kv}",
                            fixed, seeds, tuple(lrs), cost=COST.get(("mqar", m), 300),
                            rank=rank))
    return out


def _lm_cells(ctx: str, seeds, overrides=(), scale: float = 1.0, rank: int = 0,
              mixers=LM_MIXERS) -> list[Cell]:
    """Long-context LMs (`experiments/lm.py`, `long` scale) with the loss by position, and
    TTT-Linear started from the trained Transformer of the same seed (same budget) — its
    from-scratch twin is the lm cell of the same spec."""
    cells = [Cell("lm", m, f"experiments/lm.py:{m},long,ctx={ctx}", tuple(overrides), seeds,
                  by_position=True, cost=COST.get(("lm", m), 200) * scale, rank=rank)
             for m in sorted(mixers, key=lambda m: m != "softmax")]  # init waits on softmax
    cells.append(Cell("init", "ttt_linear_from_softmax", f"experiments/lm.py:ttt_linear,long,"
                      f"ctx={ctx}", tuple(overrides), seeds, by_position=True,
                      init_from="lm/softmax", cost=COST[("init", "ttt_linear")] * scale,
                      rank=rank))
    return cells


PRESETS: dict[str, list[Cell]] = {
    "demo": (
        _mqar_cells((8,), SEEDS, (), ("softmax",))  # 3 seeds: the harness validated
        + _mqar_cells((8,), (0,), (), [m for m in DEMO_MQAR_MIXERS if m != "softmax"])
        + _lm_cells("1k", (0,), ("train.steps=300",), scale=0.3)
        + [Cell("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu")
           for t in (0, 2)]
    ),
    # Scheduling (see _order): rank 0 = softmax attention on MQAR at 8 pairs (it validates the
    # harness); rank 1 = the long-context LMs, TTT from the Transformer and the other mixers on
    # MQAR at 8 pairs, seed by seed; rank 2 = MQAR at 16 pairs; rank 3 = the ladder and vision.
    # An interrupted comparison has the headline cells first.
    "compare": (
        _mqar_cells(MQAR_PAIRS[:1], SEEDS, MQAR_LRS, ("softmax",))
        + _lm_cells("2k", SEEDS, rank=1, mixers=COMPARE_LM_MIXERS)
        + _mqar_cells(MQAR_PAIRS[:1], SEEDS, MQAR_LRS,
                      [m for m in MQAR_MIXERS if m != "softmax"], rank=1)
        + _mqar_cells(MQAR_PAIRS[1:], SEEDS, MQAR_LRS, [m for m in MQAR_MIXERS if m != "lact"],
                      rank=2)  # LaCT (~4x softmax's time at this scale) at 8 pairs only
        + [Cell("ladder", f"{i + 1}_{r}", f"experiments/ablation.py:{r},cpu", seeds=SEEDS,
                rank=3) for i, r in enumerate(LADDER)]
        + [Cell("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu",
                seeds=SEEDS, cost=90, rank=3) for t in (0, 1, 2, 4)]
    ),
    "tiny": [
        Cell("lm", "softmax", "experiments/lm.py:softmax,smoke", seeds=(0, 1), by_position=True),
        Cell("lm", "ttt_linear", "experiments/lm.py:ttt_linear,smoke"),
        Cell("mqar", "softmax_kv2", "experiments/mqar.py:softmax,n=16,kv=2,width=16,smoke",
             seeds=(0, 1), lrs=(1e-3, 3e-3)),
        Cell("init", "ttt_linear_from_softmax", "experiments/lm.py:ttt_linear,smoke",
             seeds=(0,), init_from="lm/softmax"),
    ],
}
# presets scheduled longest run first (to finish soonest) instead of by rank and seed
LONGEST_FIRST = ("demo",)
# preset -> worker processes (0: one per core, at most 2)
PRESET_JOBS = {"demo": 0, "compare": 0, "tiny": 1}


# ----------------------------------------------------------------------------- configs


def load_config(spec: str, overrides=()):
    """'path/to/file.py:arg' and ['train.steps=100', ...] -> the file's get_config(arg) with the
    overrides set, exactly as `python -m ttt.main --config=<spec> --config.<key>=<value>` loads
    it (`ttt.cli.load_config`, `ttt.config.with_defaults`, `ttt.cli.apply_overrides`).

    Raises `ttt.config.ConfigError` (one line naming the spec or the override) on any mistake.
    """
    pairs = []
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise cli.UsageError(f"--set {item}: expected key=value, e.g. --set train.steps=100")
        pairs.append((key, text))
    return cli.apply_overrides(with_defaults(cli.load_config(spec)), pairs)


def run_overrides(run: Run, workdir: str, global_overrides=()) -> list[str]:
    """Every override of one run: the cell's, the command line's, then seed, lr and init."""
    out = [*run.cell.overrides, *global_overrides, f"train.seed={run.seed}"]
    if run.lr is not None:
        out.append(f"optim.lr={run.lr!r}")
    if run.cell.init_from:
        out.append(f"init.transformer_workdir={source_dir(run, workdir)}")
    return out


def source_dir(run: Run, workdir: str) -> str:
    """The run directory of the Transformer an `init_from` run starts from (same seed; the
    chosen learning rate when that cell sweeps)."""
    group, name = run.cell.init_from.split("/")
    return os.path.join(workdir, group, name, f"s{run.seed}")


# ----------------------------------------------------------------------------- one run


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def run_one(key: str, group: str, name: str, spec: str, run_dir: str, overrides: list[str],
            by_position: bool = False, seed: int = 0, lr: float | None = None) -> dict:
    """Train `spec` in `run_dir` unless it already finished there (and evaluate it by position
    when asked); returns its run.json dict. A run whose loss diverged is finished too (its
    run.json says `diverged`): in a learning-rate sweep that is a result. wall_s and cpu_s add
    up every invocation that worked on the run (a preempted one leaves them in partial.json).

    Safe to call in a worker process (everything it needs is imported inside)."""
    marker, partial = os.path.join(run_dir, "run.json"), os.path.join(run_dir, "partial.json")
    info = _read_json(marker)
    if not info:
        from ttt.train import NonFiniteLossError, train_and_evaluate

        info = {"key": key, "name": name, "group": group, "spec": spec, "overrides": overrides,
                "seed": seed, "lr": lr}
        config = load_config(spec, overrides)
        spent = _read_json(partial)
        start, cpu = time.perf_counter(), _cpu_seconds()
        preempted = False
        try:
            summary = train_and_evaluate(config, run_dir)
            info["step"] = int(summary["step"])
            info["steps_per_s"] = summary["items_per_s"] / (
                config.train.global_batch_size * (config.data.get("seq_len") or 1)
                if config.model.kind == "lm" else config.train.global_batch_size)
            preempted = summary["preempted"]  # SIGTERM: checkpoint saved, a rerun resumes
        except NonFiniteLossError as err:
            info["diverged"] = str(err).split(";")[0]
        except Exception as err:  # one broken variant must not sink the whole comparison
            traceback.print_exc()
            info["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        info["wall_s"] = spent.get("wall_s", 0.0) + time.perf_counter() - start
        info["cpu_s"] = spent.get("cpu_s", 0.0) + _cpu_seconds() - cpu
        os.makedirs(run_dir, exist_ok=True)
        if preempted:
            with open(partial, "w") as f:
                json.dump({"wall_s": info["wall_s"], "cpu_s": info["cpu_s"]}, f)
            raise KeyboardInterrupt(f"{name} preempted at step {info['step']}")
        if "error" in info:
            return info
        with open(marker, "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(partial):
            os.remove(partial)
    if by_position and not info.get("diverged") and \
            not os.path.exists(os.path.join(run_dir, "eval", "validation.json")):
        try:
            _evaluate_by_position(run_dir)
        except Exception as err:
            traceback.print_exc()
            info = {**info, "error": f"evaluation: {type(err).__name__}: {err}"}
    return info


def _evaluate_by_position(run_dir: str) -> None:
    """`ttt.evaluate.evaluate_run` on the whole validation split -> RUN/eval/validation.json
    (with the evaluation's own wall and CPU seconds)."""
    from ttt.evaluate import evaluate_run

    start, cpu = time.perf_counter(), _cpu_seconds()
    result = evaluate_run(run_dir, "validation")
    result.update(wall_s=time.perf_counter() - start, cpu_s=_cpu_seconds() - cpu)
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    with open(os.path.join(run_dir, "eval", "validation.json"), "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- the plan


def finished(run: Run, workdir: str) -> dict | None:
    """run.json of a finished run, else None."""
    path = os.path.join(workdir, run.key, "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def best_lr(cell: Cell, workdir: str) -> float | None:
    """The sweep's best learning rate once every sweep run of `cell` finished, else None:
    highest accuracy for MQAR, lowest validation loss otherwise; diverged runs rank last."""
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
    from ttt.train.train import run_differences

    sections = ("model", "data", "optim", "init", "train")
    found = []
    for cell in cells:
        for run in expand(cell, args.workdir)[0]:
            saved = _read_json(os.path.join(args.workdir, run.key, "config.json"))
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


# ----------------------------------------------------------------------------- execution


def _pin(counter) -> None:
    """Pool initializer: pin this worker to one core before JAX starts, so XLA runs
    single-threaded on it (tiny models: parallel single-threaded runs beat split ops)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[index % len(cores)]})


def _args_of(run: Run, args) -> tuple:
    return (run.key, run.cell.group, run.cell.name, run.cell.spec,
            os.path.join(args.workdir, run.key), run_overrides(run, args.workdir, args.overrides),
            run.cell.by_position, run.seed, run.lr)


def _complete(run: Run, workdir: str) -> dict | None:
    """run.json of a run that needs nothing more (trained, and evaluated by position when its
    cell asks), else None."""
    done = finished(run, workdir)
    if done is None:
        return None
    if run.cell.by_position and not done.get("diverged") and not os.path.exists(
            os.path.join(workdir, run.key, "eval", "validation.json")):
        return None
    return done


def _order(run: Run, index: int, longest_first: bool) -> tuple:
    """Scheduling key: the cell's rank, then seed by seed (every cell's first seed, with its
    sweep, before any second seed), then the cells' order; or simply the longest first."""
    if longest_first:
        return (-run.cell.cost, index)
    return (run.cell.rank, run.cell.seeds.index(run.seed), index)


def _next_run(cells: list[Cell], args, taken: set[str], infos: dict, bar) -> Run | None:
    """The run to start now (see `_order`): not taken, its Transformer (if any) finished.
    Complete runs met on the way are recorded as done."""
    candidates = []
    for index, cell in enumerate(cells):
        for run in expand(cell, args.workdir)[0]:
            if run.key in taken or not ready(run, args.workdir):
                continue
            done = _complete(run, args.workdir)
            if done is not None:
                taken.add(run.key)
                infos[run.key] = done
                bar.update(1)
                continue
            candidates.append((_order(run, index, args.longest_first), run))
    if not candidates:
        return None
    run = min(candidates, key=lambda c: c[0])[1]
    taken.add(run.key)
    return run


def _schedule(cells: list[Cell], args, jobs: int, bar) -> dict:
    """Train every run of `cells`, `jobs` at a time, in the cells' order (a preset lists the
    most informative first, so an interrupted comparison has finished those). The plan is
    recomputed whenever a run ends: a sweep's other seeds and the init runs start as soon as
    they can. Returns key -> run.json dict (or {"error": ...})."""
    infos: dict[str, dict] = {}
    taken: set[str] = set()

    def record(run, info):
        infos[run.key] = info
        bar.set_postfix_str(f"{run.key} {info.get('wall_s', 0):.0f}s")
        bar.update(1)

    if jobs <= 1:
        while (run := _next_run(cells, args, taken, infos, bar)) is not None:
            print(f"\n{run.key}  ({run.cell.spec})", file=sys.stderr, flush=True)
            record(run, run_one(*_args_of(run, args)))
        return infos
    ctx = multiprocessing.get_context("spawn")  # a clean JAX runtime per worker
    counter = ctx.Value("i", 0)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pin,
                                                initargs=(counter,)) as pool:
        running: dict[concurrent.futures.Future, Run] = {}
        try:
            while True:
                while len(running) < jobs:
                    run = _next_run(cells, args, taken, infos, bar)
                    if run is None:
                        break
                    a = list(_args_of(run, args))
                    a[5] = [*a[5], "train.progress=False"]  # one bar here, not one per worker
                    running[pool.submit(run_one, *a)] = run
                if not running:
                    break
                done, _ = concurrent.futures.wait(
                    running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    run = running.pop(future)
                    try:
                        record(run, future.result())
                    except Exception as err:  # a worker died (e.g. out of memory)
                        record(run, {"key": run.key, "name": run.cell.name,
                                     "group": run.cell.group, "error": repr(err)})
        except KeyboardInterrupt:
            # Each worker's trainer turns SIGTERM into a checkpoint (a rerun resumes there);
            # the executor has no public handle on its processes.
            processes = list((getattr(pool, "_processes", None) or {}).values())
            for process in processes:
                if process.is_alive():
                    process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return infos


def _cells(args) -> list[Cell]:
    """The cells to run. Each spec is loaded here with the overrides, so a bad one fails before
    anything trains."""
    from experiments.report import group_of

    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    if args.preset:
        keep = set(args.only.split(",")) if args.only else None
        cells = [c for c in PRESETS[args.preset] if keep is None or c.group in keep]
        if keep is not None:  # an init cell needs its Transformer
            names = {f"{c.group}/{c.name}" for c in cells}
            cells += [c for c in PRESETS[args.preset] if c not in cells and any(
                x.init_from == f"{c.group}/{c.name}" for x in cells) and
                f"{c.group}/{c.name}" not in names]
    else:
        cells = []
        for spec in args.configs or []:
            name = (os.path.basename(spec.partition(":")[0])[:-3] + "_" +
                    spec.partition(":")[2].replace(",", "_").replace("=", "")).strip("_")
            group = group_of(load_config(spec, args.overrides).to_dict())
            cells.append(Cell(group, name, spec))
    if seeds is not None:
        cells = [dataclasses.replace(c, seeds=seeds) for c in cells]
    for cell in cells:
        load_config(cell.spec, [*cell.overrides, *args.overrides])
    return cells


def _machine() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{jax.devices()[0].device_kind} ({cpu}), {os.cpu_count()} cores visible, "
            f"jax {jax.__version__}")


def _planned(cell: Cell) -> int:
    return len(cell.seeds) + max(len(cell.lrs) - 1, 0)


def _header(args, wall: float, summaries: list[dict], cells: list[Cell],
            failures: list[dict]) -> str:
    cpu = sum(s["cpu_s"] for s in summaries if math.isfinite(s["cpu_s"]))
    cpu += sum(s.get("eval_cpu_s", 0.0) for s in summaries)
    done = {}
    for s in summaries:
        if s.get("key"):
            cell = s["key"].rsplit("/", 1)[0]
            done[cell] = done.get(cell, 0) + 1
    planned = sum(_planned(c) for c in cells)
    missing = [f"{c.group}/{c.name} ({done.get(f'{c.group}/{c.name}', 0)} of {_planned(c)})"
               for c in cells if done.get(f"{c.group}/{c.name}", 0) < _planned(c)]
    lines = [f"Command: `python -m experiments.compare {' '.join(args.argv)}`",
             f"Date: {datetime.date.today().isoformat()}; machine: {_machine()}.",
             f"Runs finished: {sum(done.values())} of {planned} planned"
             + (f"; unfinished cells (runs done of planned): {', '.join(missing)}."
                if missing else "."),
             f"Wall time of this invocation: {wall / 60:.1f} min (runs reused from earlier "
             f"invocations count 0). CPU time of the finished runs (training and evaluation, "
             f"every invocation): {cpu / 3600:.2f} h — on n idle cores the comparison takes "
             "about this / n.",
             "Cells show mean ± standard deviation over their seeds (n). A difference between "
             "two cells is reported as a **finding** only when it exceeds the spread: "
             "|Δ mean| > sd₁ + sd₂ (the mean ± sd intervals do not overlap; for two position "
             "ranges of the same runs: |mean per-seed Δ| > 2 sd of those Δ); single-seed cells "
             "support no finding."]
    if failures:
        lines.append("Failed runs: " + "; ".join(f"{f.get('key', f.get('name'))}: {f['error']}"
                                                 for f in failures))
    return "\n\n".join(lines)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--configs", nargs="*", help="experiments/<file>.py:<arg> specs")
    parser.add_argument("--runs", nargs="*", default=[], help="finished run dirs to include")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", help="comma-separated groups of the preset to run")
    parser.add_argument("--seeds", help="comma-separated seeds for every cell (default: the "
                                        "preset's; 0 for --configs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override applied to every run, e.g. train.steps=100 (the "
                             "same as ttt.main's --config.train.steps=100)")
    parser.add_argument("--force", action="store_true",
                        help="delete the cells' runs first and train everything again")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once, each in a worker pinned to one core "
                             "(default: the preset's; one per core up to 2)")
    args = parser.parse_args(argv)
    args.argv = argv  # the report header records the command as given
    if not (args.preset or args.configs or args.runs):
        parser.error("give --preset, --configs or --runs")

    from tqdm import tqdm

    from experiments.report import build_report, summarize

    if threading.current_thread() is threading.main_thread():
        # SIGTERM stops the comparison like Ctrl-C: workers checkpoint, a rerun resumes
        signal.signal(signal.SIGTERM, _raise_interrupt)

    start = time.perf_counter()
    try:
        cells = _cells(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 2
    args.longest_first = args.preset in LONGEST_FIRST
    jobs = args.jobs if args.jobs is not None else PRESET_JOBS.get(args.preset, 1)
    if jobs == 0:
        jobs = max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1))
    if args.force:  # a clean slate: a sweep must not pick its rate from runs about to be redone
        for cell in cells:
            shutil.rmtree(os.path.join(args.workdir, cell.group, cell.name), ignore_errors=True)
    elif (problem := stale(cells, args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    total = sum(_planned(c) for c in cells)
    with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as bar:
        infos = _schedule(cells, args, jobs, bar)
    print(f"{(time.perf_counter() - start) / 60:.1f} min elapsed", file=sys.stderr)
    failures = [i for i in infos.values() if "error" in i]
    dirs = []
    for cell in cells:
        for run in expand(cell, args.workdir)[0]:
            run_dir = os.path.join(args.workdir, run.key)
            if os.path.exists(os.path.join(run_dir, "run.json")):
                dirs.append(run_dir)
    selected_keys = {r.key for c in cells for r in selected(c, args.workdir)}
    summaries = [summarize(d) for d in dirs]
    for s in summaries:
        s["selected"] = s.get("key") in selected_keys or s.get("key") is None
    summaries += [summarize(d) for d in args.runs]  # given by hand: always in the report
    text = build_report(summaries, args.workdir, header=_header(
        args, time.perf_counter() - start, summaries, cells, failures))
    print("\n" + text)
    print(f"report: {os.path.join(args.workdir, 'report.md')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as err:
        print(f"\nstopped ({err or 'interrupted'}); run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
