"""A run's directory: created and checked before anything is written (`prepare_workdir`), held
by one training process at a time (`WorkdirLock`), the resolved config it holds (`read_config`),
and the check that a restart is the same run (`check_same_run`: model and data settings equal,
runtime settings free to differ).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time

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


LOCK_NAME = "train.lock"


class WorkdirLock:
    """`WORKDIR/train.lock`, held by the training process for its lifetime (a context manager).

    The file is created with O_CREAT | O_EXCL, held with an exclusive `flock` and holds JSON
    {host, pid, start (UTC ISO), command}; it is removed on release. A second acquirer raises
    WorkdirError (one line naming the holder) and touches nothing in the workdir. A lock left by a
    process of this host that no longer exists, or whose flock is free, is taken over with a
    warning; a lock written on another host counts as held (its flock cannot be checked from
    here), and the message names the file to remove if that host is gone.
    """

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> WorkdirLock:
        patience = time.monotonic() + 2.0  # for a lock file that is being written right now
        while self._fd is None:
            self._fd = self._create()
            if self._fd is None:
                self._examine(patience)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # removed before the flock is let go, so no one finds it free and ours
            if os.fstat(self._fd).st_ino == _inode(self.path):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def _create(self) -> int | None:
        """A new lock file, flocked and filled; None if one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another acquirer holds it only while reading
            if os.fstat(fd).st_ino != _inode(self.path):  # taken over as stale meanwhile
                os.close(fd)
                return None
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "start": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "command": _command_line()}
            os.write(fd, json.dumps(info).encode())
            os.fsync(fd)
        except BaseException:
            if os.fstat(fd).st_ino == _inode(self.path):
                os.unlink(self.path)
            os.close(fd)
            raise
        return fd

    def _examine(self, patience: float) -> None:
        """Raise WorkdirError if the existing lock is held; remove it if stale; return to retry."""
        try:
            fd = os.open(self.path, os.O_RDWR)  # read-write: NFS emulates flock with fcntl locks
        except PermissionError:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                free = True
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                free = False
            info = _read_lock(fd)
            if os.fstat(fd).st_ino != _inode(self.path):
                return  # replaced meanwhile
            if info is None and time.monotonic() < patience:
                time.sleep(0.05)  # being written
                return
            reason = _stale(info or {}, free)
            if reason is None:
                raise WorkdirError(self._held(info or {}))
            log.warning("workdir %s: taking over the lock %s of %s: %s", self.workdir, self.path,
                        _holder(info or {}), reason)
            os.unlink(self.path)
        finally:
            os.close(fd)

    def _held(self, info: dict) -> str:
        command = f" ({info['command']})" if info.get("command") else ""
        message = (f"workdir {self.workdir} is in use by {_holder(info)}{command}; wait for it to "
                   "finish or pick another --workdir")
        if info.get("host") and info["host"] != socket.gethostname():
            message += (f" (if host {info['host']} is gone and nothing runs there, remove "
                        f"{self.path})")
        return message


def lock_workdir(workdir: str) -> WorkdirLock:
    """`with lock_workdir(path):` holds `path`'s WorkdirLock for the block."""
    return WorkdirLock(workdir)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("ttt", "main.py")):
        argv[0] = "-m ttt.main"
    return " ".join(["python", *argv])


def _read_lock(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode()
        info = json.loads(text)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _holder(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('start', '?')}")


def _stale(info: dict, free: bool) -> str | None:
    """Why the lock described by `info` is stale, or None if it is (or may be) held."""
    if info.get("host") not in (None, socket.gethostname()):
        return None  # another host's process cannot be checked from here
    pid = info.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"pid {pid} no longer runs"
        except PermissionError:
            pass  # runs, as another user
    if free:
        return "its flock is free (the process that held it has ended)"
    return None


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
