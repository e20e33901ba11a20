"""The training driver: `train_and_evaluate(config, workdir)`, top to bottom.

Restarting the same command in the same workdir continues from the newest readable checkpoint
(parameters, optimizer state, step, PRNG key and the data iterators' positions), so a killed run
resumes to the bit. A workdir whose `config.json` names another model or dataset is refused before
anything in it is touched (one line naming the differing keys), and so is a workdir that another
run is training in (`WorkdirLock`: one line naming that process). A new run starts from a fresh
initialisation or from `config.init` (another run's parameters, a trained Transformer, an official
checkpoint: `ttt.train.init`). `train.stop_at` ends this invocation early (with a checkpoint)
without changing the learning-rate schedule of `train.steps`, for jobs that run in time slices.
SIGTERM (preemption) saves a checkpoint and returns (with several processes, at a step they all
agree on, whichever of them got the signal). Each checkpoint records its step's loss and
parameter norm; a non-finite loss raises `NonFiniteLossError` without saving, naming the
checkpoint to restart from (`ttt.train.divergence`), and `resume_step` restarts there (the later
checkpoints moved aside). A workdir already at `train.steps` changes nothing. The console (the
"ttt" logger) opens with the workdir, parameter count, data, devices and the settings changed
from the config file, then shows eval results, checkpoint saves (once committed) and a final
summary; throughput
leaves out compilation (timed on its own), evaluation and checkpointing. Only the steps that log
diagnostics (`train.diag_every`) run the model's diagnostic pass (the TTT inner-loss statistics);
the others, and evaluation, run it without (`Setup.train_step` vs `Setup.diag_step`).

What the driver shares with the compile-only report and a run's loader (`build_setup`,
`abstract_state`, `lower_train_step`, ...) lives in `ttt.train.setup`; the workdir checks and
lock in `ttt.train.lock`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm.contrib.logging import logging_redirect_tqdm

from ttt import data, models
from ttt.cli import changed_values
from ttt.config import ConfigError, validate
from ttt.files import write_atomic
from ttt.train import checkpoint as ckpt_lib
from ttt.train import faults
from ttt.train import init as init_lib
from ttt.train import metrics as metrics_lib
from ttt.train.divergence import check_finite
from ttt.train.lock import WorkdirLock
from ttt.train.setup import Setup, abstract_state, build_setup, resolve_config
from ttt.train.workdir import check_same_run, prepare_workdir, run_differences

log = logging.getLogger(__name__)


def evaluate(setup: Setup, p_eval, state, dataset, num_steps: int) -> dict:
    """Loss, perplexity (LM), accuracy and the count of scored tokens / images over `num_steps`
    batches of a fresh eval iterator (padded rows count zero)."""
    mult = setup.ttt_lr_fn(jax.device_get(setup.placement.step(state)))
    params = state.params
    totals = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
    for _, batch in zip(range(num_steps), dataset.iterator(), strict=False):
        sums = jax.device_get(p_eval(params, setup.placement.place_batch(batch), mult))
        for k in totals:
            totals[k] += float(np.ravel(sums[k])[0])
    loss = totals["loss_sum"] / max(totals["weight"], 1e-9)
    out = {"loss": loss, "accuracy": totals["correct"] / max(totals["weight"], 1e-9),
           "count": totals["weight"]}  # unmasked tokens / images scored
    if setup.task.kind == "lm":
        out["perplexity"] = float(np.exp(min(loss, 80.0)))
    return out


class _Preemption:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) -> a checkpoint at a step every process agrees on,
    then exit; a second signal while that is under way exits at once (status 128 + the signal),
    leaving the newest committed checkpoint as it was.

    One process: a Python handler sets a flag that the loop reads after each step.
    Several processes (`jax.distributed`): JAX's preemption sync manager catches SIGTERM on any of
    them and tells the others through the coordination service; `reached_preemption_sync_point`
    then turns True at the same step on every process (the next step after the largest step any
    of them had reached), so all save that step together (orbax's save is collective) and exit.
    Without the sync manager (`jax_enable_preemption_service` off) the processes' flags are
    combined after every step instead (one all-gather of a flag).

    While it is in place both signals are unblocked in this thread, and `close` restores the
    mask it found: a worker that blocks them between runs (`experiments.scheduler`) gets a stop
    request that arrived while it was idle or setting up at its next run's first step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            from jax._src import distributed

            manager = distributed.global_state.preemption_sync_manager
        except (ImportError, AttributeError):  # pragma: no cover - another JAX layout
            manager = None
        self._sync = jax.process_count() > 1 and manager is not None
        self.signal = "SIGTERM"  # the signal that asked to stop
        self._previous_int = None
        if threading.current_thread() is threading.main_thread():
            # with the sync manager, its own SIGTERM handler must stay in place; SIGINT is
            # passed on to it as a SIGTERM
            if not self._sync:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._previous_int = signal.signal(signal.SIGINT, self._handle)
        self._mask = None
        if hasattr(signal, "pthread_sigmask"):
            self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK,
                                                {signal.SIGTERM, signal.SIGINT})

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested:  # the second signal: no more waiting for the checkpoint
            sys.stderr.write(f"\n{name} again: exiting at once, without a checkpoint of this step "
                             "(the newest committed one is kept)\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested, self.signal = True, name
        if self._sync and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop_at(self, step: int) -> bool:
        """Whether every process saves `step` and stops (call after every step, on all)."""
        if self._sync:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        elif jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(self.requested))
            self.requested = bool(np.any(flags))
        return self.requested

    def close(self):
        if self._mask is not None:  # first: a handler restored on an unblocked thread could
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)  # re-raise (scheduler._hold)
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)


def _config_error(err: Exception, section: str, where: str) -> ConfigError:
    """One line naming the key: 'config.data.seq_len must ...' or 'config.model: ...'."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if msg.startswith(f"{section}."):
        return ConfigError(f"config.{msg}")
    return ConfigError(f"{where}: {msg}")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


ESTIMATE_STEPS = 3  # steps timed (after compilation) for the console's estimate of the rest


def _estimate_line(per_step: float, left: int, total: int) -> str:
    """'estimated: 12.3 s per step, ~41 min for the 1,997 steps left of 2,000 (...)'."""
    rest = per_step * left
    when = f"{rest / 3600:.1f} h" if rest >= 5400 else (f"{rest / 60:.0f} min" if rest >= 90
                                                         else f"{rest:.0f} s")
    return (f"estimated: {per_step:.3g} s per step, ~{when} for the {left:,} steps left of "
            f"{total:,} on this machine (evaluation and checkpoints extra; cut the run with "
            "--config.train.steps=N)")


def _describe_start(setup: Setup, meta: dict, state, workdir: str, where: str,
                    changes: list[str] | None, source: str | None) -> list[str]:
    """The console's opening lines: workdir, model and parameters, data, devices, changes."""
    c = setup.config
    m, t = c.model, c.train
    params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.placement.params(state))))
    sizes = [_plural(m.num_layers, "layer") if m.get("num_layers") else "",
             f"width {m.width}" if m.get("width") else "",
             _plural(m.num_heads, "head") if m.get("num_heads") else ""]
    sizes = ", ".join(x for x in sizes if x)
    pattern = m.get("pattern")  # a hybrid stack names its pattern instead of model.mixer
    mixer = m.mixer if not pattern else "hybrid " + (
        pattern if isinstance(pattern, str) else ",".join(pattern))
    lines = [f"workdir: {workdir} ({where})",
             f"model: {m.kind} {mixer} (preset {m.get('preset')}{': ' + sizes if sizes else ''}"
             f"), {params:,} parameters"]
    if m.kind == "lm":
        data = (f"data: {c.data.name}, {t.global_batch_size} x {meta['seq_len']} tokens per step"
                f" ({setup.items_per_step:,})")
    else:
        data = f"data: {c.data.name}, {t.global_batch_size} images per step"
    if t.get("eval_every", 0):
        data += (f"; eval on {c.data.get('eval_split', 'validation')!r} every "
                 f"{_plural(t.eval_every, 'step')} ({_plural(t.get('eval_steps', 1), 'batch')})")
    lines.append(data.replace("batchs", "batches"))
    devices = jax.devices()
    placement = setup.placement
    mode = t.parallel
    if mode == "mesh":
        mode += " (" + ", ".join(f"{k} {v}" for k, v in placement.mesh.shape.items()) + ")"
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    lines.append(f"devices: {len(devices)} x {devices[0].platform}{processes}; parallel={mode}, "
                 f"{_plural(placement.num_replicas, 'data-parallel replica')}")
    if changes is not None:
        lines.append(f"changed from {source or 'the config file'}: "
                     + ("; ".join(changes) if changes else "nothing"))
    return lines


def train_and_evaluate(config, workdir: str, *, build_model=None, make_dataset=None,
                       defaults=None, source: str | None = None,
                       resume_step: int | None = None) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint; returns a summary dict:
    {"step", "preempted", "train" (last logged metrics), "eval" (last eval), "state",
    "compile_s", "train_s" (training time without compilation, eval and checkpoints),
    "items_per_s", "params"}.

    defaults: the config file's own config (before command-line overrides); the console lists
    what differs from it. source: its name for that line. Console lines go to the "ttt" logger
    (`ttt.cli.console()` shows them on stderr, as the command lines do). The workdir is locked
    (`WorkdirLock`, by process 0) from before anything in it is read until the run ends, so a
    second run on it stops at once.

    resume_step: restart from that checkpoint (0: from the initialisation); the checkpoints after
    it move to `diverged_checkpoints/`. A run already at or past `train.steps` changes nothing.
    """
    validate(config)
    workdir = prepare_workdir(workdir)
    facts = {}  # what _train learnt that an error message may need
    with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext(), \
            faults.quiet_checkpoint_threads():
        try:
            return _train(config, workdir, build_model or models.build_model,
                          make_dataset or data.make_dataset, defaults, source, resume_step, facts)
        except Exception as err:
            fault = faults.explain(err, workdir, facts.get("state_bytes"))
            if fault is None:
                raise
            raise fault from err


def _train(config, workdir: str, build_model, make_dataset, defaults, source,
           resume_step, facts) -> dict:
    """`train_and_evaluate` in a prepared and locked workdir; `facts` gets the checkpoint size."""
    train_cfg = config.train
    pid, nproc = jax.process_index(), jax.process_count()
    say = log.info if pid == 0 else (lambda *args: None)
    try:
        train_ds = make_dataset(config.data, "train", train_cfg.global_batch_size,
                                seed=train_cfg.seed, shard_index=pid, shard_count=nproc)
        eval_ds = None
        if train_cfg.get("eval_every", 0):
            eval_ds = make_dataset(config.data, config.data.get("eval_split", "validation"),
                                   train_cfg.global_batch_size, seed=train_cfg.seed,
                                   shard_index=pid, shard_count=nproc)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise _config_error(err, "data", f"config.data.name={config.data.name!r}") from err
    config = resolve_config(config, train_ds.meta)
    saved = check_same_run(workdir, config)  # before anything in the workdir is touched
    try:
        setup = build_setup(config, train_ds.meta, build_model)
    except ValueError as err:
        raise _config_error(err, "model", "config.model") from err
    placement = setup.placement

    # State: the newest readable checkpoint, else config.init's parameters or a fresh init.
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=int(train_cfg.get("keep_checkpoints", 3)),
        keep_every=train_cfg.get("keep_every", None),
        async_save=bool(train_cfg.get("async_checkpoints", True)))
    try:
        data_iter = train_ds.iterator()
        abstract = abstract_state(setup)
        facts["state_bytes"] = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                                   for x in jax.tree.leaves(abstract))
        if resume_step is not None:
            moved = ckpt.keep_until(resume_step)
            if moved:
                say("resume_step=%d: checkpoints %s moved to %s", resume_step, moved,
                    os.path.join(workdir, "diverged_checkpoints"))
        try:
            restored = ckpt.restore(placement.restore_target(abstract))
        except ckpt_lib.CheckpointMismatchError as err:
            changed = run_differences(saved or {}, json.loads(config.to_json_best_effort()),
                                      ("optim", "train"))
            if not changed:
                raise
            raise ckpt_lib.CheckpointMismatchError(
                f"{err} (settings changed since: {'; '.join(changed[:4])})") from None
        if restored is None:
            start = 0
            initial = init_lib.initial_params(config, abstract.params)
            if initial is None:
                state, where = placement.place_state(setup.create_state), "new run"
            else:
                state = placement.place_state(setup.create_state, initial[0])
                where = f"new run from {initial[1]}"
        else:
            start, state, data_state = restored
            state = placement.from_checkpoint(state)
            if data_state is not None:
                data_iter.set_state(data_state)
            where = f"resumed from checkpoint step {start}"
            if init_lib.chosen(config):
                where += f"; config.init.{init_lib.chosen(config)[0]} ignored"
    except BaseException:
        ckpt.close()
        raise
    last_good = start if restored is not None else None
    if start >= int(train_cfg.steps):  # nothing to train: nothing in the workdir changes
        ckpt.close()
        if start > int(train_cfg.steps):
            raise ConfigError(
                f"config.train.steps={train_cfg.steps}: the run in {workdir} is already at step "
                f"{start}; nothing was changed (raise train.steps to continue it, or pass "
                "--resume_step with an earlier checkpoint)")
        say("done already: step %d of %d in %s; nothing was changed", start, start, workdir)
        return {"step": start, "preempted": False, "train": {}, "eval": {}, "state": state,
                "compile_s": 0.0, "train_s": 0.0, "items_per_s": float("nan"), "params": None}
    init_norm = (ckpt.stats(start) or {}).get("init_param_norm") if restored else None
    init_norm = init_norm or _param_norm(placement.params(state))
    if pid == 0:
        write_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
    changes = None
    if defaults is not None:
        changes = changed_values(resolve_config(defaults, train_ds.meta), config)
    for line in _describe_start(setup, train_ds.meta, state, workdir, where, changes, source):
        say(line)

    total = int(train_cfg.steps)
    log_every = int(train_cfg.get("log_every", 50))
    diag_every = int(train_cfg.get("diag_every", log_every))
    ckpt_every = int(train_cfg.get("checkpoint_every", 1000))
    eval_every = int(train_cfg.get("eval_every", 0))
    eval_steps = int(train_cfg.get("eval_steps", 1))
    stop_at = int(train_cfg.get("stop_at", 0) or 0)  # 0: run to train.steps
    summary = {"step": start, "preempted": False, "train": {}, "eval": {}, "compile_s": 0.0,
               "train_s": 0.0, "items_per_s": float("nan"), "params": None}
    writer = metrics_lib.MetricWriter(workdir, enabled=pid == 0, start=start)
    p_eval = placement.compile_eval(setup.eval_step)
    preemption = _Preemption()
    progress = None
    unchecked, first_unchecked = [], start
    step_loss = None  # the loss of the latest step (device array)

    def save(step):
        nonlocal unchecked, first_unchecked, last_good
        check_finite(unchecked, first_unchecked, last_good, workdir, ckpt)
        unchecked, first_unchecked = [], step
        stats = {"loss": float(np.ravel(jax.device_get(step_loss))[0]),
                 "param_norm": _param_norm(placement.params(state)), "init_param_norm": init_norm}
        ckpt.save(step, placement.to_checkpoint(state), data_iter.get_state(), force=True,
                  stats=stats)
        last_good = step
        announce()

    def announce():
        """'checkpoint: step N' for each save that has committed (async saves finish later)."""
        for step in ckpt.committed():
            say("checkpoint: step %d -> %s", step, os.path.join(workdir, "checkpoints", str(step)))

    def run_eval(step):
        t = time.perf_counter()
        result = evaluate(setup, p_eval, state, eval_ds, eval_steps)
        first = not summary["eval"]
        summary["eval"] = writer.write(step, result, "eval/")
        extra = f", perplexity {result['perplexity']:.4g}" if "perplexity" in result else ""
        say("eval @ step %d: loss %.4f%s, accuracy %.4f over %s %s (%.1f s%s)", step,
            result["loss"], extra, result["accuracy"], f"{int(result['count']):,}", setup.unit,
            time.perf_counter() - t, ", compilation included" if first else "")

    compiled = {}  # diagnostics on? -> the compiled train step

    def compiled_step(diag: bool, batch):
        """The compiled step for this step (compiled on first use, outside the throughput)."""
        fn = setup.diag_step if diag and setup.diag_step is not None else setup.train_step
        if fn not in compiled:
            t = time.perf_counter()
            compiled[fn] = placement.compile_train(fn).lower(state, batch).compile()
            seconds = time.perf_counter() - t
            summary["compile_s"] += seconds
            if progress is not None:
                progress.exclude(seconds)
            say("compiled the train step in %.1f s%s", seconds,
                " (with the diagnostics pass)" if fn is setup.diag_step else "")
        return compiled[fn]

    def logs_diagnostics(done: int) -> bool:
        return (done % log_every == 0 or done == total) and (done % diag_every == 0 or
                                                             done == total)

    try:
        with _redirect_console():
            if start < total:
                # Compile ahead of the first step, so the compile time is reported on its own
                # and the throughput counts training only.
                batch = placement.place_batch(next(data_iter))
                say("compiling the train step ...")
                compiled_step(logs_diagnostics(start + 1), batch)
                progress = metrics_lib.Progress(
                    total, start, setup.unit, enabled=pid == 0 and train_cfg.get("progress", True))
            timed_from, estimate_at = time.perf_counter(), min(start + ESTIMATE_STEPS, total)
            compile_before = summary["compile_s"]
            for step in range(start, total):
                if step > start:
                    batch = placement.place_batch(next(data_iter))
                done = step + 1
                diag = logs_diagnostics(done)
                state, metrics = compiled_step(diag, batch)(state, batch)
                unchecked.append(metrics["loss"])
                step_loss = metrics["loss"]
                announce()
                if done == estimate_at and done < total:  # what the rest will take, measured here
                    jax.block_until_ready(state)
                    spent = (time.perf_counter() - timed_from
                             - (summary["compile_s"] - compile_before))
                    per_step = spent / (done - start)
                    say(_estimate_line(per_step, total - done, total))
                if done % log_every == 0 or done == total:
                    host = placement.host_metrics(metrics)
                    check_finite(unchecked, first_unchecked, last_good, workdir, ckpt)
                    unchecked, first_unchecked = [], done
                    if not diag:
                        host.pop("aux")
                    rate = progress.update(done, host["loss"], setup.items_per_step)
                    logged = {**host, f"{setup.unit}_per_s": rate}
                    summary["train"] = writer.write(done, logged, "train/")
                paused = time.perf_counter()
                if eval_ds is not None and (done % eval_every == 0 or done == total):
                    run_eval(done)
                summary["step"] = done
                if done == stop_at:  # a time-sliced job: same schedule, continued by the next call
                    save(done)
                    break
                if preemption.stop_at(done):
                    log.warning("%s: saving a checkpoint at step %d and exiting (%s again "
                                "exits at once)", preemption.signal, done, preemption.signal)
                    summary["preempted"], summary["signal"] = True, preemption.signal
                    save(done)
                    break
                if done % ckpt_every == 0 or done == total:
                    save(done)
                progress.exclude(time.perf_counter() - paused)
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        ckpt.close()  # waits for the last save to commit (a second signal still exits at once)
        preemption.close()
    announce()  # the saves that committed at the end
    summary["state"] = state
    summary["params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(placement.params(state))))
    if progress is not None:
        summary["train_s"], summary["items_per_s"] = progress.train_seconds, progress.mean_rate
    say(_final_line(summary, setup, total, stop_at, workdir))
    return summary


def _param_norm(params) -> float:
    """The global L2 norm of a parameter tree (one jitted reduction; replicated result)."""
    return float(jax.jit(optax.tree.norm)(params))


def _final_line(summary: dict, setup: Setup, total: int, stop_at: int, workdir: str) -> str:
    step = summary["step"]
    if summary["preempted"]:
        what = "interrupted (SIGINT)" if summary.get("signal") == "SIGINT" else "preempted"
        head = f"{what} at step {step} of {total}: checkpoint saved; rerun to resume"
    elif step < total:
        head = f"paused at step {step} of {total} (train.stop_at={stop_at}); rerun to continue"
    else:
        head = f"done: step {step} of {total}"
    parts = [head]
    if summary["compile_s"]:
        parts.append(f"{summary['train_s']:.1f} s training + {summary['compile_s']:.1f} s "
                     f"compilation, {summary['items_per_s']:,.0f} {setup.unit}/s")
    if summary["train"]:
        parts.append(f"train loss {summary['train']['train/loss']:.4f}")
    if summary["eval"]:
        ev = summary["eval"]
        text = f"eval loss {ev['eval/loss']:.4f}"
        if "eval/perplexity" in ev:
            text += f" (perplexity {ev['eval/perplexity']:.4g})"
        parts.append(text + f", accuracy {ev['eval/accuracy']:.4f}")
    return "; ".join(parts) + f"; {workdir}"


def _redirect_console():
    """Log lines printed above the progress bar instead of through it."""
    return logging_redirect_tqdm(loggers=[logging.getLogger("ttt")])
