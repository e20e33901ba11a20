"""Checkpoints with orbax: train state (float32 parameters, optimizer state, step, PRNG key) and
every process's data-iterator position, saved asynchronously.

Notable choices
- The state is saved as global arrays (see `parallel.Placement.to_checkpoint`) and restored onto
  abstract arrays carrying the *current* shardings, so 8 devices -> 1 device (or pmap -> mesh)
  works.
- Retention: the last `keep` checkpoints plus every multiple of `keep_every` (milestones).
- A latest checkpoint that fails to restore (partial write, corrupt file) is skipped with a warning
  and the previous one is used. Orbax writes into a temporary directory and renames it when the save
  is complete, so a run killed mid-save leaves no step directory behind.
- Saving refuses low-precision floats: the official code stored bf16 weights; here a bf16 leaf in
  the state is a bug, not a rounding.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


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
                 async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=("state", "data"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict | None, *, force: bool = False) -> bool:
        """Start an (async) save of `state` (global arrays) and this process's iterator state."""
        if step in self.manager.all_steps():
            return False
        check_full_precision(state)
        data = {"process_count": jax.process_count(), "states": _allgather_json(data_state)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=force)

    def restore(self, target):
        """Newest readable checkpoint onto `target` (abstract arrays with shardings).

        Returns (step, state, data_state for this process or None), or None if there is none.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 — any unreadable checkpoint is skipped
                log.warning("checkpoint %s/%d could not be restored (%s: %s); moved to %s and "
                            "falling back to the previous one", self.directory, step,
                            type(err).__name__, (str(err).splitlines() or [""])[0][:200],
                            self._quarantine_dir)
                self._quarantine(step)
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
