"""How a comparison's runs are trained: `schedule` starts the runs of the cells in order
(`_order`: by rank and seed, or the longest first), `jobs` at a time in worker processes each
pinned to its own core (`_pin`), recomputes the plan whenever a run ends, and reaps the workers;
`run_one` trains (and evaluates) one run, in a worker or in this process. The workers keep
XLA's compiled programs in the workdir (`compilation_cache`), so a cell's later seeds load its
train and evaluation steps instead of compiling them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import platform
import resource
import signal
import sys
import threading
import time
import traceback

from experiments.grid import Cell, Run, run_overrides
from experiments.plan import expand, finished, read_json, ready
from experiments.specs import load_config
from ttt.evaluate import read_result
from ttt.files import write_json_atomic


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(key: str, group: str, name: str, spec: str, run_dir: str, overrides: list[str],
            by_position: bool = False, seed: int = 0, lr: float | None = None) -> dict:
    """Train `spec` in `run_dir` unless it already finished there (and evaluate it by position
    when asked); returns its run.json dict. A run whose loss diverged is finished too (its
    run.json says `diverged`): in a learning-rate sweep that is a result. wall_s and cpu_s add
    up every invocation that worked on the run (a preempted one leaves them in partial.json).

    Safe to call in a worker process (a spawned worker imports this module, then JAX here)."""
    marker, partial = os.path.join(run_dir, "run.json"), os.path.join(run_dir, "partial.json")
    info = read_json(marker)
    if not info:
        # here, not at the top: ttt.train imports JAX, which experiments.compare's --help and
        # argument errors do without (it imports this module)
        from ttt.train import NonFiniteLossError, train_and_evaluate

        info = {"key": key, "name": name, "group": group, "spec": spec, "overrides": overrides,
                "seed": seed, "lr": lr}
        config = load_config(spec, overrides)
        spent = read_json(partial)
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
            write_json_atomic(partial, {"wall_s": info["wall_s"], "cpu_s": info["cpu_s"]})
            raise KeyboardInterrupt(f"{name} stopped by {summary.get('signal', 'SIGTERM')} at "
                                    f"step {info['step']} (checkpoint saved)")
        if "error" in info:
            return info
        write_json_atomic(marker, info, indent=2)
        if os.path.exists(partial):
            os.remove(partial)
    if by_position and not info.get("diverged") and \
            read_result(os.path.join(run_dir, "eval", "validation.json")) is None:
        try:
            _evaluate_by_position(run_dir)
        except Exception as err:
            traceback.print_exc()
            info = {**info, "error": f"evaluation: {type(err).__name__}: {err}"}
    return info


def _evaluate_by_position(run_dir: str) -> None:
    """`ttt.evaluate.evaluate_run` on the whole validation split -> RUN/eval/validation.json
    (with the evaluation's own wall and CPU seconds), written whole or not at all; a missing or
    cut-off one is evaluated again (`read_result`)."""
    from ttt.evaluate import evaluate_run  # imports JAX: here, as in run_one

    start, cpu = time.perf_counter(), _cpu_seconds()
    result = evaluate_run(run_dir, "validation")
    result.update(wall_s=time.perf_counter() - start, cpu_s=_cpu_seconds() - cpu)
    os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "eval", "validation.json"), result)


def compilation_cache(workdir: str) -> str:
    """Where a comparison's workers keep XLA's compiled programs (JAX's persistent compilation
    cache): WORKDIR/.xla_cache/<machine>-<hash of the CPU's model and feature flags>, so a
    workdir carried to another CPU compiles afresh (XLA:CPU refuses a program built for other
    features). A cell's later seeds differ from its first seed's run only in the seed, an input
    of the same programs: they load them instead of compiling (each rate of a sweep is a
    constant of its own train step and compiles once)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = {line for line in f if line.startswith(("model name", "flags", "Features",
                                                              "CPU part"))}
    except OSError:
        lines = {platform.processor()}
    tag = hashlib.sha1("".join(sorted(lines)).encode()).hexdigest()[:12]
    return os.path.join(workdir, ".xla_cache", f"{platform.machine()}-{tag}")


def _pin(counter, cache_dir: str | None = None) -> None:
    """Pool initializer: pin this worker to one core before JAX starts, so XLA runs
    single-threaded on it (tiny models: parallel single-threaded runs beat split ops), and
    point JAX's compilation cache at `cache_dir` (unless JAX_COMPILATION_CACHE_DIR is set).

    It also holds SIGTERM and SIGINT back until a run trains: the trainer unblocks them in this
    (main) thread while it trains, where a stop saves a checkpoint. A worker that is idle (or
    setting a run up) must not die of a stop request: its death breaks the pool, and the
    executor then signals the saving workers a second time (exit without saving)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) > 1:
        os.sched_setaffinity(0, {cores[index % len(cores)]})
    if cache_dir:
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)  # read when JAX imports
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.signal(signal.SIGTERM, _hold)
        signal.signal(signal.SIGINT, _hold)


def _hold(signum, frame) -> None:
    """A worker's threads started before `_pin` (numpy's BLAS thread) do not block the signals,
    so one may take the process's signal: this handler (run by the main thread) makes it the
    main thread's own, pending until the trainer unblocks it there."""
    del frame
    signal.pthread_kill(threading.get_ident(), signum)


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
    if run.cell.by_position and not done.get("diverged") and read_result(
            os.path.join(workdir, run.key, "eval", "validation.json")) is None:
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


STOP_WAIT_S = 300  # how long a stopped comparison waits for its workers' checkpoints


def _stop(pool, running: dict, pass_on: bool) -> None:
    """Stop the workers after Ctrl-C (it reached them too: one process group) or SIGTERM (passed
    on here, `pass_on`): each trainer saves a checkpoint and returns (a rerun resumes there); idle
    workers block both signals (`_pin`). Waits for the running runs, then lets the workers exit;
    one still running after STOP_WAIT_S (or a second Ctrl-C / SIGTERM) is killed, its newest
    committed checkpoint kept. The executor has no public handle on its processes."""
    processes = [p for p in (getattr(pool, "_processes", None) or {}).values() if p.is_alive()]
    if pass_on:
        for process in processes:
            process.terminate()
    try:
        _, stuck = concurrent.futures.wait(running, timeout=STOP_WAIT_S)
    except KeyboardInterrupt:
        stuck = running
    if stuck:
        for process in processes:
            process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def schedule(cells: list[Cell], args, jobs: int, bar) -> dict:
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
    pin = (ctx.Value("i", 0), compilation_cache(args.workdir))
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pin,
                                                initargs=pin) as pool:
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
        except KeyboardInterrupt as err:
            _stop(pool, running, str(err) == "SIGTERM received")
            raise
    return infos
