"""A run's directory: created and checked before anything is written (`prepare_workdir`), the
resolved config it holds (`read_config`), and the check that a restart is the same run
(`check_same_run`: model and data settings equal, runtime settings free to differ). The lock that
keeps it to one training process is `ttt.train.lock`.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections as mlc

from ttt.config import OPTIONAL, ConfigError

log = logging.getLogger(__name__)


class WorkdirError(ConfigError):
    """The workdir cannot be used for this run (unwritable, or it holds another run)."""


# Settings that change how a run computes, not what it computes: they may differ on resume
# (data.delay_s: the test stand-in's slow input pipeline).
RUNTIME_KEYS = ("model.remat", "model.dtype", "model.mixer_kwargs.unroll",
                "model.mixer_kwargs.remat_every", "model.mixer_kwargs.stats", "data.num_threads",
                "data.prefetch", "data.data_dir", "data.delay_s")


def prepare_workdir(workdir: str) -> str:
    """Create `workdir` if needed and check it is writable; its absolute path. Called before any
    data or model is set up, so a bad --workdir fails first."""
    path = os.path.abspath(os.path.expanduser(str(workdir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir}: exists and is not a directory; pick another "
                           "--workdir")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise WorkdirError(f"--workdir={workdir}: cannot be created ({err.strerror}); pick a "
                           "writable --workdir") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir}: not writable; pick a writable --workdir")
    return path


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1, 'c': {}}} -> {'a.b': 1} (an empty dict holds no setting)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_RESOLVED_SIZES = tuple(f"model.{k}" for k in ("num_layers", "width", "num_heads", "ffn_dim",
                                                "mlp_dim", "vocab_size", "num_classes",
                                                "image_size", "channels"))


def run_differences(saved: dict, current: dict, sections=("model", "data")) -> list[str]:
    """The settings of two config dicts that differ in `sections` ('key: A there, B here').

    Keys in RUNTIME_KEYS may differ; a size that is None on either side (left to the preset or
    the dataset: an older version did not write resolved sizes, and a config not yet resolved
    has none) matches anything."""
    a = _flat({s: saved.get(s) or {} for s in sections})
    b = _flat({s: current.get(s) or {} for s in sections})
    optional = _flat(OPTIONAL)  # a key absent on one side holds its default
    out = []
    for key in sorted(set(a) | set(b)):
        unresolved = key in _RESOLVED_SIZES and None in (a.get(key, 0), b.get(key, 0))
        if key in RUNTIME_KEYS or unresolved:
            continue
        if key in optional and a.get(key, optional[key]) == b.get(key, optional[key]):
            continue
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            there = repr(a[key]) if key in a else "unset"
            here = repr(b[key]) if key in b else "unset"
            out.append(f"{key}: {there} there, {here} here")
    return out


def check_same_run(workdir: str, config) -> dict | None:
    """WorkdirError unless `workdir` is new or its config.json has this run's model and data;
    returns the saved config dict (None for a new workdir)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise WorkdirError(f"{path} does not read ({err}): move it away or pick a new --workdir"
                           ) from None
    diffs = run_differences(saved, json.loads(config.to_json_best_effort()))
    if diffs:
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise WorkdirError(
            f"workdir {workdir} holds a run of another model or data ({'; '.join(diffs[:4])}"
            f"{more}); nothing was changed: pass a new --workdir, or the settings of "
            f"{path} to resume it")
    return saved


def read_config(workdir: str) -> mlc.ConfigDict:
    """The resolved config a run saved in `workdir/config.json`."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"{workdir}: no such run directory")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir} holds no config.json: not a directory written by "
                          "python -m ttt.main")
    try:
        with open(path) as f:
            return mlc.ConfigDict(json.load(f))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} does not read as JSON ({err})") from None
