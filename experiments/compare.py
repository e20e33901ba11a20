r"""Train the cells of a comparison (every seed, after a learning-rate sweep) and build one report.

  python -m experiments.compare --preset demo --workdir runs/demo        # `make demo` (~13 min)
  python -m experiments.compare --preset compare --workdir runs/compare  # `make compare` (~7 h)
  python -m experiments.compare --preset compare --only lm --workdir runs/mine \
      --set data.name=text_files --set "data.paths=['~/my_texts']"       # long context, own text
  python -m experiments.compare --workdir runs/mine --seeds 0,1,2 \
      --configs experiments/lm.py:ttt_linear,cpu experiments/lm.py:softmax,cpu  # your variants
  python -m experiments.compare --workdir runs/report --runs runs/a runs/b  # report only
  python -m experiments.compare --preset compare --only 'mqar/deltanet_*' --seeds 0 \
      --workdir runs/compare                                              # part of a preset

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
over threads) and keeping XLA's compiled programs in `WORKDIR/.xla_cache`
(`scheduler.compilation_cache`: a cell's later seeds load their first seed's programs),
in the order of the preset's cells:
the most informative first, so an interrupted comparison has finished those (`demo` lists the
longest first instead, to finish soonest). The report (`WORKDIR/report.md`, the
PNGs and `results.json`, see `experiments.report`) is built only from the runs' files;
`--report-only` builds it from the runs finished so far and trains nothing (an interrupted
comparison's report, each cell by the protocol: a sweep's best rate once its sweep is done).

Presets (runtimes measured on an idle 2-core machine, see README):
  demo     12.7 minutes measured (2026-12-07). MQAR at the harness setting (N = 64, 8 pairs,
           width 64; linear attention and TTT-Linear at 1 seed, softmax at 2 seeds: the harness
           validated),
           long-context byte LMs (context 1k, 150 steps, 1 seed; softmax, linear attention,
           TTT-Linear, TTT-MLP, Gated DeltaNet, TTT-Linear x3 + sliding window) by position,
           TTT-Linear from the trained Transformer vs from scratch, MTTT vision (T = 0, 2).
  compare  ~9 hours: ~3 measured, then ~6 for the new rows (their 81 runs measured: 12.5
           CPU hours on a 2-core Intel Xeon, 2026-12-07). MQAR at 8 and 16 pairs (LaCT at 8):
           a 2-rate sweep (1e-3, 3e-3) per mixer and pair count, then 3 seeds at the best
           rate; long-context LMs at 2k, 3 seeds each; TTT-Linear from the Transformer, 3
           seeds; the ablation ladder and MTTT vision (T = 0, 1, 2, 4), 3 seeds. Then the same
           MQAR and 2k LM cells for DeltaNet, Gated DeltaNet, Mamba2, Titans, gated TTT-Linear
           and two hybrids (TTT-Linear x3 + sliding window, Gated DeltaNet x3 + softmax).
  frontier not run whole (estimated ~63 h on 2 cores; its width-64 points ran for 4 mixers,
           docs/results.md): the capacity frontier, MQAR at 256 tokens and 64 pairs at
           widths 64 / 128 / 256 for every MQAR mixer, 1 seed per point and 3 at width 128,
           trained on Zoology's mixture of pair counts (4 ... 64) for 3,000
           steps, every mixer at lr 1e-3 at width 256: what softmax attention needed to
           reach 0.99 at every width (at the harness's 1,750 steps without the mixture it
           stayed at 0.03; at width 256 lr 3e-3 stayed on the plateau; `experiments/grid.py`
           has the runs).
  tiny     smoke runs that exercise every mechanism (seeds, sweep, init, by-position) in tests.
To add a mixer to the comparison (e.g. a new registry entry), add its name to MQAR_MIXERS and/or
COMPARE_LM_MIXERS in `experiments/grid.py` (LM_MIXERS: the demo's LMs too).

The modules: `experiments.grid` (what is trained: the presets' cells), `experiments.plan` (which
runs each cell has and which finished, from the workdir), `experiments.scheduler` (the worker
processes that train them), `experiments.specs` (spec -> config); this one is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time

from experiments.grid import LONGEST_FIRST, PRESET_JOBS, PRESETS, Cell
from experiments.plan import expand, selected, stale
from experiments.scheduler import schedule
from experiments.specs import load_config
from ttt import cli
from ttt.config import ConfigError


def _chosen(cell: Cell, keep) -> bool:
    """Whether `--only` picks the cell: one of `keep` is its group or matches GROUP/NAME
    (fnmatch wildcards)."""
    return any(k == cell.group or fnmatch.fnmatchcase(f"{cell.group}/{cell.name}", k)
               for k in keep)


def _cells(args) -> list[Cell]:
    """The cells to run. Each spec is loaded here with the overrides, so a bad one fails before
    anything trains."""
    # here, not at the top: experiments.report imports numpy, whose BLAS thread would start
    # unpinned in a worker (a spawned worker imports the __main__ module before scheduler._pin)
    from experiments.report import group_of

    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    if args.preset:
        keep = args.only.split(",") if args.only else None
        cells = [c for c in PRESETS[args.preset] if keep is None or _chosen(c, keep)]
        if keep is not None:
            if missing := [k for k in keep if not any(_chosen(c, [k]) for c in cells)]:
                raise ValueError(f"--only {','.join(missing)}: no cell of preset "
                                 f"{args.preset!r} matches (groups: "
                                 f"{', '.join(sorted({c.group for c in PRESETS[args.preset]}))}"
                                 f"; cells: GROUP/NAME, * and ? as wildcards)")
            # an init cell needs its Transformer
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
    import jax  # here, not at the top: --help and argument errors answer without JAX

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
    from experiments.report import MIN_SEEDS, NA_SEEDS  # here: see _cells

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
             f"two cells is reported as a **finding** only with ≥ {MIN_SEEDS} seeds on each "
             "side and when it exceeds the spread: |Δ mean| > sd₁ + sd₂ (the mean ± sd "
             "intervals do not overlap; for two position ranges of the same runs: |mean "
             "per-seed Δ| > 2 sd of those Δ); with fewer seeds the verdict is "
             f"'{NA_SEEDS}'."]
    if failures:
        lines.append("Failed runs: " + "; ".join(f"{f.get('key', f.get('name'))}: {f['error']}"
                                                 for f in failures))
    return "\n\n".join(lines)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM received")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--configs", nargs="*", help="experiments/<file>.py:<arg> specs")
    parser.add_argument("--runs", nargs="*", default=[], help="finished run dirs to include")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", help="comma-separated groups or cells (GROUP/NAME, wildcards "
                                       "allowed: 'mqar/*_kv8') of the preset to run")
    parser.add_argument("--seeds", help="comma-separated seeds for every cell (default: the "
                                        "preset's; 0 for --configs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override applied to every run, e.g. train.steps=100 (the "
                             "same as ttt.main's --config.train.steps=100)")
    parser.add_argument("--force", action="store_true",
                        help="delete the cells' runs first and train everything again")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report of the cells' runs already "
                             "finished (an interrupted comparison's; its header lists the "
                             "unfinished cells)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once, each in a worker pinned to one core "
                             "(default: the preset's; one per core up to 2)")
    args = parser.parse_args(argv)
    args.argv = argv  # the report header records the command as given
    if not (args.preset or args.configs or args.runs):
        parser.error("give --preset, --configs or --runs")
    if args.report_only and args.force:
        parser.error("--report-only trains nothing and --force deletes runs: give one")

    # here, not at the top: a spawned worker imports the __main__ module before scheduler._pin
    # pins it to a core, and numpy's BLAS thread (experiments.report) would start unpinned there
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
    infos = {}
    if not args.report_only:
        with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as bar:
            infos = schedule(cells, args, jobs, bar)
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
        # what stopped: a run's trainer ("<run> stopped by SIGINT at step N (checkpoint
        # saved)"), SIGTERM, or Ctrl-C while no run was in this process
        print(f"\ncomparison stopped: {str(err) or 'SIGINT (Ctrl-C) received'}; finished runs "
              "are kept and runs in progress saved a checkpoint: run the same command again to "
              "resume", file=sys.stderr)
        sys.exit(130)
