"""Budgets that follow a cut run: when `train.steps` is set below the config file's own, the
step counts that were sized for the full run follow it, unless they were set as well.

- `optim.warmup_steps` keeps its share of the run: floor(warmup · steps / file's steps) (a
  2,000-step config with 200 warm-up steps cut to 20 steps warms up for 2);
- the intervals `train.log_every`, `diag_every`, `eval_every`, `checkpoint_every` and `keep_every`
  are capped at `train.steps` (each still happens, at the end of the run);
the learning-rate decay already spans `train.steps`. The console's "changed from" line shows each
value that followed. Shared by `python -m ttt.main` and `experiments.compare --set train.steps=N`.
"""

from __future__ import annotations

INTERVALS = ("log_every", "diag_every", "eval_every", "checkpoint_every", "keep_every")


def follow_steps(config, file_steps, set_keys=()) -> list[str]:
    """Scale, in place, the step counts of `config` to its (cut) `train.steps`; `file_steps` is
    the config file's own train.steps; keys in `set_keys` ("optim.warmup_steps", ...) were given
    by the user and are left alone. Returns "key: old -> new" for each value changed."""
    steps = config.train.get("steps") if "train" in config else None
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (steps, file_steps))
    if not ints or not 1 <= steps < file_steps:
        return []
    set_keys = {k.removeprefix("config.") for k in set_keys}
    changed = []

    def update(section, key, new):
        old = config[section][key]
        if new != old:
            with config.unlocked() if hasattr(config, "unlocked") else _nothing():
                config[section][key] = new
            changed.append(f"{section}.{key}: {old} -> {new}")

    optim = config.get("optim")
    warmup = optim.get("warmup_steps") if optim is not None else None
    if isinstance(warmup, int) and "optim.warmup_steps" not in set_keys and warmup > 0:
        update("optim", "warmup_steps", min(warmup, warmup * steps // file_steps))
    for key in INTERVALS:
        value = config.train.get(key)
        if isinstance(value, int) and value > steps and f"train.{key}" not in set_keys:
            update("train", key, steps)
    return changed


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
