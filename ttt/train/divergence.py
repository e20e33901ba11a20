"""Which checkpoint a diverged run should restart from, and the block of text that says so.

Every checkpoint records the training loss of its step and the norm of its parameters (its
"stats" item, see `ttt.train.checkpoint`). When the loss turns NaN or infinite the trainer stops
and prints, for each checkpoint it holds, that loss and norm, then the command that restarts from
the chosen one (`--resume_step=N`) with a lower learning rate.

The rule (`restart_step`), walking the checkpoints in step order:
- a checkpoint is *sound* when its loss is finite and at most LOSS_FACTOR times the lowest loss
  of the checkpoints up to it, and its parameter norm is at most NORM_FACTOR times the norm of the
  run's initial parameters;
- the blow-up starts at the first unsound checkpoint, or at the non-finite step when all are
  sound;
- the chosen step is the last sound checkpoint before it, and, when the blow-up shows in a loss
  rather than in a checkpoint's own norm, before the step preceding it too: the loss of step s is
  computed with the parameters after step s - 1, so a checkpoint saved on that step may already
  hold the parameters that blew up;
- none qualifies: step 0, a restart from the initialisation (every checkpoint is moved aside).

`check_finite` raises `NonFiniteLossError` carrying those lines and the chosen step; the command
line (`ttt.main`) adds the restart command.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np

LOSS_FACTOR = 1.5
NORM_FACTOR = 10.0


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; nothing is saved at or after that step.

    `details`: lines listing the checkpoints with their loss and parameter norm;
    `restart_step`: the checkpoint to restart from (0: from the initialisation)."""

    def __init__(self, message: str, details: list[str] = (), restart_step: int = 0):
        super().__init__(message)
        self.details, self.restart_step = list(details), restart_step


def check_finite(losses: list, first_step: int, last_good: int | None, workdir: str,
                 ckpt=None) -> None:
    """NonFiniteLossError if any of `losses` (steps first_step + 1, ...) is NaN or infinite,
    with the checkpoints' losses and norms and the step to restart from (read from `ckpt`)."""
    values = np.asarray(jax.device_get(losses), np.float64).ravel()
    bad = np.flatnonzero(~np.isfinite(values))
    if not bad.size:
        return
    bad_step = first_step + int(bad[0]) + 1
    held = [(s, ckpt.stats(s)) for s in ckpt.all_steps()] if ckpt is not None else []
    restart = restart_step(held, bad_step)
    kept = (f"The newest checkpoint (step {last_good}) in {workdir}/checkpoints is kept"
            if last_good is not None else "No checkpoint had been saved yet")
    raise NonFiniteLossError(
        f"training loss is {values[bad[0]]} at step {bad_step}; stopping. {kept}: restart from "
        f"step {restart} with a lower config.optim.lr (or a longer config.optim.warmup_steps)",
        report(held, bad_step, os.path.join(workdir, "checkpoints")), restart)


def sound(stats: dict | None, best_loss: float) -> bool:
    """Whether a checkpoint's stats pass the rule (see the module doc); `best_loss` includes it."""
    if not stats:
        return False
    loss = stats.get("loss")
    if loss is None or not math.isfinite(loss) or loss > LOSS_FACTOR * best_loss:
        return False
    return _norm_sound(stats)


def _norm_sound(stats: dict) -> bool:
    norm, init = stats.get("param_norm"), stats.get("init_param_norm")
    return norm is not None and init is not None and math.isfinite(norm) and \
        norm <= NORM_FACTOR * init


def restart_step(checkpoints: list[tuple[int, dict | None]], bad_step: int) -> int:
    """The step to restart from (0: the initialisation); `checkpoints` are (step, stats) in step
    order, `bad_step` the step whose loss was not finite."""
    best, limit, good = math.inf, bad_step - 1, []
    for step, stats in checkpoints:
        loss = (stats or {}).get("loss")
        if loss is not None and math.isfinite(loss):
            best = min(best, loss)
        if not sound(stats, best):
            limit = step if stats and not _norm_sound(stats) else step - 1
            break
        good.append(step)
    before = [s for s in good if s < limit]
    return before[-1] if before else 0


def _describe(step: int, stats: dict | None, chosen: int, best: float) -> str:
    if not stats:
        return f"  step {step}: no loss recorded (written by an older version)"
    norm, init = stats.get("param_norm"), stats.get("init_param_norm")
    growth = f" ({norm / init:.3g}x the initial {init:.4g})" if norm and init else ""
    mark = "  <- restart here" if step == chosen else ""
    flag = "" if sound(stats, best) else "  (blown up)"
    return (f"  step {step}: training loss {stats.get('loss'):.4g}, parameter norm "
            f"{norm:.4g}{growth}{flag}{mark}")


def report(checkpoints: list[tuple[int, dict | None]], bad_step: int, directory: str) -> list[str]:
    """The lines listing the checkpoints with their loss and norm, the chosen one marked."""
    chosen = restart_step(checkpoints, bad_step)
    if not checkpoints:
        return [f"no checkpoint had been saved yet in {directory}"]
    lines = [f"checkpoints in {directory}:"]
    best = math.inf
    for step, stats in checkpoints:
        loss = (stats or {}).get("loss")
        if loss is not None and math.isfinite(loss):
            best = min(best, loss)
        lines.append(_describe(step, stats, chosen, best))
    return lines
