"""Metrics out of the loop: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL file, and
a progress bar with step, loss, throughput and ETA. Only process 0 writes.

Array-valued diagnostics (the models' `aux`, e.g. `inner_loss` of shape (layers, steps)) are
flattened into one scalar per entry: `inner_loss/layer_0/1` is layer 0's loss after inner step 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

from ttt.files import cut_jsonl

log = logging.getLogger(__name__)


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{"aux": {"inner_loss": (L, T) array}} -> {"aux/inner_loss/layer_0/0": float, ...}."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name + "/"))
            continue
        arr = np.asarray(value, np.float64)
        if arr.ndim == 0:
            flat[name] = float(arr)
        elif arr.size <= 256:
            # First axis is the layer axis by the aux convention; the rest is flattened.
            rows = arr.reshape(arr.shape[0], -1)  # (layers, rest)
            for i, row in enumerate(rows):
                for j, v in enumerate(row):
                    flat[f"{name}/layer_{i}" + (f"/{j}" if rows.shape[1] > 1 else "")] = float(v)
        else:
            flat[f"{name}/mean"] = float(arr.mean())
    return flat


class MetricWriter:
    """Writes scalars to `workdir/tb` (TensorBoard) and `workdir/metrics.jsonl`.

    `start`: the step the run starts from (its restored checkpoint, 0 for a new run). The rows
    of metrics.jsonl after it (written by an earlier invocation past its last checkpoint) and a
    line cut off by a kill are dropped before anything is appended, so the file holds each step
    once, in order, whatever was killed when; the TensorBoard events after it are purged."""

    def __init__(self, workdir: str, enabled: bool = True, start: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self.dropped = 0  # rows of metrics.jsonl dropped on opening
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        path = os.path.join(workdir, "metrics.jsonl")
        if start is not None:
            self.dropped = cut_jsonl(path, start)
            if self.dropped:
                log.info("metrics.jsonl: %d line%s after step %d dropped (logged after the last "
                         "checkpoint, or cut off by a kill)", self.dropped,
                         "" if self.dropped == 1 else "s", start)
        # purge_step: TensorBoard hides the earlier invocation's events after `start` likewise
        self._tb = SummaryWriter(os.path.join(workdir, "tb"),
                                 purge_step=None if start is None else start + 1)
        self._jsonl = open(path, "a")  # noqa: SIM115

    def write(self, step: int, metrics: dict, prefix: str = "") -> dict[str, float]:
        flat = flatten_metrics(metrics, prefix)
        if self.enabled:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step)
            self._jsonl.write(json.dumps({"step": step, **flat}) + "\n")
            self._jsonl.flush()
        return flat

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


class Progress:
    """One status line: step/total, loss, tokens (or images) per second, elapsed and ETA.

    Throughput counts training time only: the clock starts after compilation, and the time the
    loop spends in evaluation and checkpoints is taken out with `exclude(seconds)`.
    """

    def __init__(self, total: int, start: int, unit: str, enabled: bool = True):
        self.total, self.unit, self.enabled = total, unit, enabled
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", unit="step",
                             file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self._t, self._step, self._excluded = time.perf_counter(), start, 0.0
        self.train_seconds, self._items = 0.0, 0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (evaluation, checkpointing) out of the throughput."""
        self._excluded += seconds

    def update(self, step: int, loss: float, items_per_step: int) -> float:
        """Advance to `step`; returns the throughput since the last update (items/s)."""
        now = time.perf_counter()
        seconds = max(now - self._t - self._excluded, 1e-9)
        items = (step - self._step) * items_per_step
        rate = items / seconds
        self.train_seconds += seconds
        self._items += items
        self._t, self._step, self._excluded = now, step, 0.0
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss={loss:.4f} {self.unit}/s={rate:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)
        return rate

    @property
    def mean_rate(self) -> float:
        """Items per second of training over every update so far."""
        return self._items / self.train_seconds if self.train_seconds else float("nan")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
