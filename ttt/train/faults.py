"""Training's machine faults in one line: a checkpoint save that could not be written (disk full,
quota, file size limit, permissions) and an out-of-memory at compile or run time become a
`ResourceError` (the command lines print it as `error: ...`, exit status 2).

Orbax writes a checkpoint in background threads into a temporary directory and renames it when
complete; a failed write surfaces in the training thread at the next save or when the run closes
its checkpointer, which `train_and_evaluate` turns into one line naming the directory, what ran
out, the checkpoint's size against the free space, and the newest committed step (intact: the
failed one never got its final name). Until then the threads' own reports of the same failure
(absl and asyncio log records, and tracebacks of abandoned writes at exit) are held back by
`quiet_checkpoint_threads`; if no failure surfaces they are logged when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback

from ttt.errors import ResourceError, disk_error, out_of_memory_error


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


class _HoldOrbaxErrors(logging.Filter):
    """Keeps back error records that orbax's checkpoint threads (or the event loops they run)
    log about a failed write."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        if "orbax" in record.pathname or "orbax-checkpoint-tmp" in text:
            self.held.append(record)
            return False
        return True


_REPORTED = []  # set once a checkpoint fault was reported in this process


@contextlib.contextmanager
def quiet_checkpoint_threads():
    """While active, orbax's background error records wait (see the module doc), and the
    'Event loop is closed' tracebacks of the reads and writes a failed save leaves in flight
    (tensorstore posts their results to an event loop orbax has closed) are dropped."""
    hold = _HoldOrbaxErrors()
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    for logger in loggers:
        logger.addFilter(hold)
    previous = sys.unraisablehook

    def hook(unraisable):
        err = unraisable.exc_value
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(hold)
        if not _REPORTED:
            if sys.unraisablehook is hook:  # (a hook set on top of it since stays, with it)
                sys.unraisablehook = previous
            for record in hold.held:
                logging.getLogger(record.name).handle(record)


def _silence_abandoned_writes() -> None:
    """After a reported save failure, the writes orbax abandoned log their errors or print
    'Exception ignored in <coroutine ...>' tracebacks until the interpreter exits; those say
    nothing more, drop them (for the rest of the process)."""
    drop = _HoldOrbaxErrors()
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(drop)
    previous = sys.unraisablehook

    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback \
            else []
        if any("orbax" in f.filename for f in frames) or \
                str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _through_orbax(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if "orbax" in str(err) or any("orbax" in f.filename
                                      for f in traceback.extract_tb(err.__traceback__)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _filename(err: BaseException) -> str | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.filename:
            return str(err.filename)
        err = err.__cause__ or err.__context__
    return None


def _free(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return f"{_mb(shutil.disk_usage(path or '/').free)} free there"
    except OSError:
        return "free space unknown"


def committed_steps(directory: str) -> list[int]:
    """The steps with a committed checkpoint in `directory` (orbax's finished step directories;
    a write in progress or abandoned has a temporary name)."""
    try:
        return sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    except OSError:
        return []


def explain(err: BaseException, workdir: str, state_bytes: int | None) -> ResourceError | None:
    """`err` from training as a one-line ResourceError (out of memory, or a write that failed for
    lack of space or permission), else None."""
    oom = out_of_memory_error(err, "training (compiling or running a step)")
    if oom is not None:
        return oom
    what = disk_error(err)
    if what is None:
        return None
    directory = os.path.join(workdir, "checkpoints")
    if _through_orbax(err):
        _REPORTED.append(err)
        _silence_abandoned_writes()
        need = f"a checkpoint of this run needs about {_mb(state_bytes)}; " if state_bytes else ""
        steps = committed_steps(directory)
        kept = (f"the newest committed checkpoint, step {steps[-1]}, is intact: make room (or "
                "raise the quota) and rerun the same command to resume from it" if steps else
                "no checkpoint was committed yet: make room (or raise the quota) and rerun")
        return ResourceError(f"checkpoint save failed in {directory}: {what} ({need}"
                             f"{_free(directory)}); {kept}")
    path = _filename(err) or workdir
    return ResourceError(f"writing {path} failed: {what} ({_free(path)}); make room or pick "
                         "another --workdir, then rerun the same command")
