"""The error a user can fix by changing the configuration: one line naming the key to change.

A leaf module (it imports nothing of `ttt`), so every level that reports such mistakes — the data
pipelines, config validation, the trainer, the command lines — raises the same type, and the
command lines turn any of them into `error: <message>` and exit status 2. `ResourceError` is the
same for what the machine ran out of (memory, disk space, permission to write); `disk_error` and
`out_of_memory` recognise those in an exception or its causes, including the text C++ libraries
(tensorstore, XLA) put in their errors.
"""


class ConfigError(ValueError):
    """A configuration mistake a user can fix; the message names the offending key."""


class ResourceError(ConfigError):
    """The machine ran out of memory or disk space, or may not write where a command must; the
    message names what ran out, where, and what to change."""


# errno -> what it means for the user (the ones a write of results or checkpoints meets)
_DISK_ERRNOS = {28: "no space left on the device", 122: "disk quota exceeded",
                27: "file size limit exceeded", 13: "permission denied",
                1: "operation not permitted", 30: "read-only file system"}
# the same, as C++ libraries (tensorstore, XLA) spell them inside their own error text
_DISK_TEXTS = (("no space left", 28), ("quota exceeded", 122), ("file too large", 27),
               ("permission denied", 13), ("read-only file system", 30))
_OOM_TEXTS = ("resource_exhausted", "out of memory", "std::bad_alloc", "failed to allocate")


def _chain(err: BaseException):
    """`err`, then its causes and contexts (each once)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def disk_error(err: BaseException) -> str | None:
    """What a failed write ran into ('no space left on the device', ...), or None when `err`
    (or its cause) is not a full, limited or unwritable disk."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[e.errno]
        text = str(e).lower()
        for needle, code in _DISK_TEXTS:
            if needle in text:
                return _DISK_ERRNOS[code]
    return None


def out_of_memory(err: BaseException) -> str | None:
    """The allocation an out-of-memory error names ('Out of memory while trying to allocate
    8.00GiB', 'host memory'), or None when `err` (or its cause) is not one."""
    for e in _chain(err):
        if isinstance(e, MemoryError):
            return "host memory (MemoryError)"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        hits = [line for line in lines if any(t in line.lower() for t in _OOM_TEXTS)]
        if hits:
            named = [line for line in hits if "allocat" in line.lower()] or hits
            return named[0][:200]
    return None


def out_of_memory_error(err: BaseException, while_doing: str) -> ResourceError | None:
    """A one-line ResourceError for an out-of-memory `err` (what to lower), else None."""
    what = out_of_memory(err)
    if what is None:
        return None
    return ResourceError(
        f"out of memory while {while_doing} ({what}): lower config.train.global_batch_size or "
        "config.data.seq_len, or set config.model.remat=block (recompute blocks in the backward "
        "pass), or use a smaller model")
