"""The training driver: `train_and_evaluate(config, workdir)`, top to bottom.

Restarting the same command in the same workdir continues from the newest readable checkpoint
(parameters, optimizer state, step, PRNG key and the data iterators' positions), so a killed run
resumes to the bit. `train.stop_at` ends this invocation early (with a checkpoint) without
changing the learning-rate schedule of `train.steps`, for jobs that run in time slices. SIGTERM
(preemption) saves a checkpoint and returns; a non-finite loss raises `NonFiniteLossError`
without saving, so the last good checkpoint stays the newest.

The pieces are separate functions so a compile-only tool can reuse them: `build_setup` (config ->
model, optimizer, placement, pure state constructor), `abstract_state` (`jax.eval_shape`) and
`lower_train_step` (lowering on abstract arguments, nothing allocated).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttt.config import ConfigError, validate
from ttt.train import checkpoint as ckpt_lib
from ttt.train import metrics as metrics_lib
from ttt.train import optim as optim_lib
from ttt.train import parallel, steps

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class Setup:
    """Everything derived from the config before any array is allocated."""

    config: Any
    task: steps.Task
    tx: Any
    placement: Any
    create_state: Callable[[], steps.TrainState]  # pure; run under jit by the placement
    train_step: Callable  # partial of steps.train_step
    eval_step: Callable  # partial of steps.eval_step
    ttt_lr_fn: Callable
    dummy_batch: dict  # one global batch of zeros with the real shapes and dtypes
    items_per_step: int
    unit: str


def _default_builders():
    from ttt.data import make_dataset
    from ttt.models import build_model

    return build_model, make_dataset


def dummy_batch(config, meta: dict) -> dict:
    """Zeros shaped like one global batch (for init and lowering; never trained on)."""
    b = config.train.global_batch_size
    if config.model.kind == "lm":
        n = meta["seq_len"]
        return {"inputs": np.zeros((b, n), np.int32), "targets": np.zeros((b, n), np.int32),
                "mask": np.ones((b, n), np.float32)}
    return {"images": np.zeros((b, *meta["image_shape"]), np.float32),
            "labels": np.zeros((b,), np.int32)}


def resolve_config(config, meta: dict):
    """Copy of `config` with dataset-dependent model fields (vocab, classes, image size) filled."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if config.model.kind == "lm" and config.model.get("vocab_size") is None:
            config.model.vocab_size = int(meta["vocab_size"])
        if config.model.kind == "vit":
            if config.model.get("num_classes") is None:
                config.model.num_classes = int(meta["num_classes"])
            if config.model.get("image_size") is None:
                config.model.image_size = int(meta["image_shape"][0])
            if config.model.get("channels") is None:
                config.model.channels = int(meta["image_shape"][2])
    return config


def build_setup(config, meta: dict, build_model) -> Setup:
    """Model, task, optimizer, placement and the pure step functions for `config`."""
    total = int(config.train.steps)
    model = build_model(config.model)
    task = steps.make_task(config, model)
    tx = optim_lib.make_optimizer(config.optim, total)
    lr_fn = optim_lib.lr_schedule(config.optim, total)
    ttt_lr_fn = optim_lib.ttt_lr_mult_schedule(config.optim)
    batch = dummy_batch(config, meta)

    def create_state():
        params_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
        params = task.init(params_rng, jax.tree.map(jnp.asarray, batch))
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=step_rng)

    lm = config.model.kind == "lm"
    return Setup(
        config=config, task=task, tx=tx, placement=parallel.make_placement(config),
        create_state=create_state,
        train_step=functools.partial(steps.train_step, task=task, tx=tx, lr_fn=lr_fn,
                                     ttt_lr_fn=ttt_lr_fn,
                                     grad_accum=int(config.train.get("grad_accum", 1))),
        eval_step=functools.partial(steps.eval_step, task=task),
        ttt_lr_fn=ttt_lr_fn, dummy_batch=batch,
        items_per_step=config.train.global_batch_size * (meta["seq_len"] if lm else 1),
        unit="tokens" if lm else "images")


def abstract_state(setup: Setup):
    """The TrainState as ShapeDtypeStructs (no memory)."""
    return jax.eval_shape(setup.create_state)


def lower_train_step(setup: Setup):
    """Lower the jitted train step on abstract global arguments (mesh / single placements)."""
    state = abstract_state(setup)
    if setup.placement.mode == "mesh":
        state = setup.placement.restore_target(state)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=setup.placement.batch_sharding), setup.dummy_batch)
    else:
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.dummy_batch)
    return setup.placement.compile_train(setup.train_step).lower(state, batch)


def evaluate(setup: Setup, p_eval, state, dataset, num_steps: int) -> dict:
    """Loss, perplexity (LM) and accuracy over `num_steps` batches of a fresh eval iterator."""
    mult = setup.ttt_lr_fn(jax.device_get(setup.placement.step(state)))
    params = state.params
    totals = {"loss_sum": 0.0, "weight": 0.0, "correct": 0.0}
    for _, batch in zip(range(num_steps), dataset.iterator(), strict=False):
        sums = jax.device_get(p_eval(params, setup.placement.place_batch(batch), mult))
        for k in totals:
            totals[k] += float(np.ravel(sums[k])[0])
    loss = totals["loss_sum"] / max(totals["weight"], 1e-9)
    out = {"loss": loss, "accuracy": totals["correct"] / max(totals["weight"], 1e-9)}
    if setup.task.kind == "lm":
        out["perplexity"] = float(np.exp(min(loss, 80.0)))
    return out


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint before exiting."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _check_finite(losses: list, first_step: int, last_good: int | None, workdir: str) -> None:
    values = np.asarray(jax.device_get(losses), np.float64).ravel()
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise NonFiniteLossError(
            f"training loss is {values[bad[0]]} at step {first_step + int(bad[0]) + 1}; stopping. "
            f"The last good checkpoint (step {last_good}) in {workdir}/checkpoints is kept: "
            "lower config.optim.lr or raise config.optim.warmup_steps and restart.")


def _config_error(err: Exception, section: str, where: str) -> ConfigError:
    """One line naming the key: 'config.data.seq_len must ...' or 'config.model: ...'."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if msg.startswith(f"{section}."):
        return ConfigError(f"config.{msg}")
    return ConfigError(f"{where}: {msg}")


def train_and_evaluate(config, workdir: str, *, build_model=None, make_dataset=None) -> dict:
    """Train `config` in `workdir`, resuming from its newest checkpoint; returns a summary dict:
    {"step", "preempted", "train" (last logged metrics), "eval" (last eval), "state"}."""
    if build_model is None or make_dataset is None:
        default_model, default_data = _default_builders()
        build_model, make_dataset = build_model or default_model, make_dataset or default_data
    validate(config)
    train_cfg = config.train
    pid, nproc = jax.process_index(), jax.process_count()
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
    try:
        setup = build_setup(config, train_ds.meta, build_model)
    except ValueError as err:
        raise _config_error(err, "model", "config.model") from err
    placement = setup.placement
    os.makedirs(workdir, exist_ok=True)
    if pid == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # State: the newest readable checkpoint, else a fresh initialisation.
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        keep=int(train_cfg.get("keep_checkpoints", 3)),
        keep_every=train_cfg.get("keep_every", None),
        async_save=bool(train_cfg.get("async_checkpoints", True)))
    data_iter = train_ds.iterator()
    restored = ckpt.restore(placement.restore_target(abstract_state(setup)))
    if restored is None:
        state = placement.place_state(setup.create_state)
        start = 0
    else:
        start, state, data_state = restored
        state = placement.from_checkpoint(state)
        if data_state is not None:
            data_iter.set_state(data_state)
        log.info("resumed from checkpoint step %d", start)
    last_good = start if restored is not None else None

    p_train = placement.compile_train(setup.train_step)
    p_eval = placement.compile_eval(setup.eval_step)
    total = int(train_cfg.steps)
    log_every = int(train_cfg.get("log_every", 50))
    diag_every = int(train_cfg.get("diag_every", log_every))
    ckpt_every = int(train_cfg.get("checkpoint_every", 1000))
    eval_every = int(train_cfg.get("eval_every", 0))
    stop_at = int(train_cfg.get("stop_at", 0) or 0)  # 0: run to train.steps
    writer = metrics_lib.MetricWriter(workdir, enabled=pid == 0)
    progress = metrics_lib.Progress(total, start, setup.unit,
                                    enabled=pid == 0 and train_cfg.get("progress", True))
    preemption = _Preemption()
    summary = {"step": start, "preempted": False, "train": {}, "eval": {}}
    unchecked, first_unchecked = [], start

    def save(step):
        nonlocal unchecked, first_unchecked, last_good
        _check_finite(unchecked, first_unchecked, last_good, workdir)
        unchecked, first_unchecked = [], step
        ckpt.save(step, placement.to_checkpoint(state), data_iter.get_state(), force=True)
        last_good = step

    try:
        for step in range(start, total):
            state, metrics = p_train(state, placement.place_batch(next(data_iter)))
            unchecked.append(metrics["loss"])
            done = step + 1
            if done % log_every == 0 or done == total:
                host = placement.host_metrics(metrics)
                _check_finite(unchecked, first_unchecked, last_good, workdir)
                unchecked, first_unchecked = [], done
                if done % diag_every and done != total:
                    host.pop("aux")
                rate = progress.update(done, host["loss"], setup.items_per_step)
                summary["train"] = writer.write(done, {**host, f"{setup.unit}_per_s": rate},
                                                "train/")
            if eval_ds is not None and (done % eval_every == 0 or done == total):
                summary["eval"] = writer.write(
                    done, evaluate(setup, p_eval, state, eval_ds,
                                   int(train_cfg.get("eval_steps", 1))), "eval/")
            summary["step"] = done
            if done == stop_at:  # a time-sliced job: same schedule, continued by the next call
                save(done)
                break
            if preemption.requested:
                log.warning("SIGTERM received: saving a checkpoint at step %d and exiting", done)
                save(done)
                summary["preempted"] = True
                break
            if done % ckpt_every == 0 or done == total:
                save(done)
    finally:
        preemption.close()
        progress.close()
        writer.close()
        ckpt.close()
    summary["state"] = state
    return summary
