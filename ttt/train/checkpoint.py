"""Checkpoints with orbax: train state (float32 parameters, optimizer state, step, PRNG key) and
every process's data-iterator position, saved asynchronously.

Notable choices
- The state is saved as global arrays (see `parallel.Placement.to_checkpoint`) and restored onto
  abstract arrays carrying the *current* shardings, so 8 devices -> 1 device (or pmap -> mesh)
  works.
- Retention: the last `keep` checkpoints plus every multiple of `keep_every` (milestones).
- A latest checkpoint that cannot be *read* (partial write, corrupt file) is moved to
  `corrupt_checkpoints/` with a warning and the previous one is used. One that reads but holds
  another train state (other parameter or optimizer shapes) is never called corrupt: restoring
  stops with a one-line `CheckpointMismatchError` and nothing is moved. Orbax writes into a
  temporary directory and renames it when the save is complete, so a run killed mid-save leaves no
  step directory behind.
- Saving refuses low-precision floats: the official code stored bf16 weights; here a bf16 leaf in
  the state is a bug, not a rounding.
- Each checkpoint carries a small JSON item "stats" (written and committed with it): the training
  loss of its step, the norm of its parameters and the norm of the run's initial parameters, so
  a diverged run can say which checkpoint to restart from (`ttt.train.divergence`).
- A save is announced only once orbax has committed it (`committed()` lists the steps whose async
  save has finished since the last call).
- `keep_until(step)` moves the checkpoints after `step` to `diverged_checkpoints/` (never
  deleted), for a restart from an earlier checkpoint (`--resume_step`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ttt.config import ConfigError

log = logging.getLogger(__name__)


class CheckpointMismatchError(ConfigError):
    """A readable checkpoint whose arrays do not fit the train state asked for."""


def signature(tree) -> dict[str, tuple]:
    """{'params/h/wq/kernel': (shape, dtype name)} for arrays, abstract arrays or orbax metadata."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"):
            (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def describe_mismatch(saved: dict, wanted: dict, limit: int = 4) -> str:
    """'' when the signatures agree, else a short list of the first differences."""
    problems = [f"{k} missing" for k in wanted if k not in saved]
    problems += [f"{k} {saved[k][0]} where this run has {wanted[k][0]}" for k in wanted
                 if k in saved and saved[k] != wanted[k]]
    problems += [f"unexpected {k}" for k in saved if k not in wanted]
    if not problems:
        return ""
    more = f" and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _ignore_closed_loop_callbacks() -> None:
    """After a failed read, tensorstore still completes the reads in flight and posts each result
    to orbax's event loop, which is closed by then: Python prints every one of those as an
    'unraisable' `RuntimeError: Event loop is closed` traceback. They carry nothing (the failure
    was reported once); drop exactly those and pass everything else to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_ttt_closed_loop", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        previous(unraisable)

    hook._ttt_closed_loop = True
    sys.unraisablehook = hook


def _allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (one collective of bytes)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))  # (P, 1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)  # (P, max_len)
    return [json.loads(bytes(row[: int(n)]).decode())
            for row, n in zip(gathered, lengths[:, 0], strict=True)]


def check_full_precision(state) -> None:
    """Raise if any floating leaf of `state` is narrower than float32."""
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
            raise TypeError(f"state{jax.tree_util.keystr(path)} is {x.dtype}; checkpoints hold "
                            "float32 parameters (compute in bf16 via model.dtype instead)")


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with items "state" and "data"."""

    def __init__(self, directory, *, keep: int = 3, keep_every: int | None = None,
                 async_save: bool = True, read_only: bool = False):
        # read_only: for reading another run (nothing created, cleaned up or deleted; orbax's own
        # read_only mode would warn on every use)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            keep_period=None if read_only else keep_every or None, create=not read_only,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only)
        self.read_only = read_only
        self.directory = directory
        self._set_aside_steps: list[int] = []  # steps this instance moved to corrupt_checkpoints
        self._pending: list[int] = []  # saved steps not yet reported as committed
        self.manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "data", "stats"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "stats": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None, *, force: bool = False,
             stats: dict | None = None) -> bool:
        """Start an (async) save of `state` (global arrays), this process's iterator state and
        `stats` (JSON: {"loss", "param_norm", "init_param_norm"})."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if step in self.manager.all_steps():
            return False
        check_full_precision(state)
        data = {"process_count": jax.process_count(), "states": _allgather_json(data_state)}
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data)}
        if stats is not None:
            items["stats"] = ocp.args.JsonSave(stats)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._pending.append(step)
        return saved

    def committed(self) -> list[int]:
        """The saved steps whose (async) save has committed since the last call, oldest first."""
        # orbax finishes one save before it starts the next: only the newest can be in flight
        busy = self._pending[-1:] if self.manager.is_saving_in_progress() else []
        done = [s for s in self._pending if s not in busy]
        self._pending = busy
        return done

    def stats(self, step: int) -> dict | None:
        """Checkpoint `step`'s stats item (None for a checkpoint written without one)."""
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(stats=ocp.args.JsonRestore()))
        except Exception:  # noqa: BLE001 — an older checkpoint has no stats item
            return None
        return dict(out["stats"] or {}) or None

    def keep_until(self, step: int) -> list[int]:
        """Move the checkpoints after `step` to `diverged_checkpoints/` (process 0); their steps.
        ConfigError (nothing moved) unless `step` is 0 or one of the checkpoints."""
        available = self.all_steps()
        if step != 0 and step not in available:
            raise ConfigError(f"--resume_step={step}: {os.path.dirname(self.directory)} has no "
                              f"checkpoint {step} (it has {available or 'none'}); pick one of "
                              "them, or 0 to start over")
        later = [s for s in available if s > step]
        if later and jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(os.path.abspath(self.directory)),
                                 "diverged_checkpoints")
            os.makedirs(aside, exist_ok=True)
            stamp = int(time.time())
            for s in later:
                shutil.move(os.path.join(self.directory, str(s)),
                            os.path.join(aside, f"{s}.{stamp}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ttt_checkpoint_keep_until_{step}")
        self.manager.reload()
        return later

    def saved_signature(self, step: int) -> dict[str, tuple]:
        """Paths, shapes and dtypes of checkpoint `step`'s state, from its metadata alone."""
        meta = self.manager.item_metadata(step)["state"]
        if meta is None:
            raise ValueError("no readable metadata")
        return signature(meta)

    def check_fits(self, step: int, target, what: str = "this run's train state") -> None:
        """CheckpointMismatchError (one line) unless checkpoint `step` has `target`'s arrays."""
        problems = describe_mismatch(self.saved_signature(step), signature(target))
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit {what} ({problems}): it was "
                "written by another model or optimizer setting; train in a new --workdir or "
                "restore the settings it was written with")

    def restore(self, target):
        """Newest readable checkpoint onto `target` (abstract arrays with shardings).

        Returns (step, state, data_state for this process or None), or None if there is none.
        A checkpoint that does not read is set aside; one that reads but does not fit `target`
        raises CheckpointMismatchError and nothing is moved.
        """
        # a bad step's late read callbacks can arrive before its read fails (even from its
        # metadata): filter them from the first read on; keep the filter only if a step was bad
        previous, set_aside = sys.unraisablehook, len(self._set_aside_steps)
        _ignore_closed_loop_callbacks()
        try:
            return self._restore_newest(target)
        finally:
            if len(self._set_aside_steps) == set_aside:
                sys.unraisablehook = previous

    def _restore_newest(self, target):
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self.saved_signature(step)
            except Exception as err:  # noqa: BLE001 — unreadable metadata: a corrupt step
                self._set_aside(step, err)
                continue
            if describe_mismatch(saved, signature(target)):
                self.check_fits(step, target)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 — any unreadable checkpoint is skipped
                self._set_aside(step, err)
                continue
            data = out["data"] or {}
            states = data.get("states") or [None]
            if data.get("process_count", 1) != jax.process_count():
                log.warning("checkpoint %d was written by %s processes, this run has %d: the data "
                            "iterators restart from their beginning", step,
                            data.get("process_count"), jax.process_count())
                return step, out["state"], None
            return step, out["state"], states[jax.process_index()]
        return None

    def restore_params(self, step: int, target_params):
        """Only the parameters of checkpoint `step` (no optimizer state is read) onto
        `target_params` (abstract arrays with shardings); CheckpointMismatchError if they differ.
        """
        saved = {k[len("params/"):]: v for k, v in self.saved_signature(step).items()
                 if k.startswith("params/")}
        problems = describe_mismatch(saved, signature(target_params))
        if problems:
            raise CheckpointMismatchError(
                f"the parameters of checkpoint {self.directory}/{step} do not fit this model "
                f"({problems})")
        target = {"params": target_params}
        out = ocp.PyTreeCheckpointer().restore(
            os.path.join(self.directory, str(step), "state"), args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
        return out["params"]

    def _set_aside(self, step: int, err: Exception) -> None:
        _ignore_closed_loop_callbacks()
        self._set_aside_steps.append(step)
        log.warning("checkpoint %s/%d could not be restored (%s: %s); moved to %s, resuming "
                    "from the previous one", self.directory, step, type(err).__name__,
                    (str(err).splitlines() or [""])[0][:200], self._quarantine_dir)
        self._quarantine(step)

    @property
    def _quarantine_dir(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.directory)),
                            "corrupt_checkpoints")

    def _quarantine(self, step: int) -> None:
        """Move an unreadable step aside, so the resumed run can write that step again."""
        if jax.process_index() == 0:
            os.makedirs(self._quarantine_dir, exist_ok=True)
            dest = os.path.join(self._quarantine_dir, f"{step}.{int(time.time())}")
            shutil.move(os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ttt_checkpoint_quarantine_{step}")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, target, step: int | None = None) -> tuple[Any, int]:
    """(parameters of `workdir`'s checkpoint `step` (newest readable when None), its step).

    `target`: the parameter tree as abstract arrays; the result lands on the first local device.
    Nothing in `workdir` is written or moved (an unreadable checkpoint is skipped with a warning).
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"{workdir} has no checkpoints/ yet: train it first")
    ckpt = Checkpointer(directory, read_only=True, async_save=False)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), target)
    try:
        available = ckpt.all_steps()
        if step is not None and step not in available:
            raise ConfigError(f"{workdir} has no checkpoint {step} (it has {available})")
        for candidate in [step] if step is not None else available[::-1]:
            try:
                return ckpt.restore_params(candidate, target), candidate
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 — an unreadable step: try the previous one
                log.warning("checkpoint %s/%d could not be read (%s: %s)", directory, candidate,
                            type(err).__name__, (str(err).splitlines() or [""])[0][:200])
        raise ConfigError(f"{workdir} has no readable checkpoint (steps: {available})")
    finally:
        ckpt.close()
