"""The workdir lock: one training process per workdir.

`WorkdirLock(workdir)` holds `WORKDIR/train.lock` (created with O_EXCL, held with an exclusive
flock; JSON {host, pid, start, command}) for a `with` block. A second acquirer gets a one-line
`WorkdirError` naming the holder and touches nothing; a lock whose process has ended on this host
(its pid is gone, or its flock is free) is taken over with a warning; another host's lock counts as
held, and the message names the file to remove if that host is gone.
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

from ttt.train.workdir import WorkdirError

log = logging.getLogger(__name__)


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
