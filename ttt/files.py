"""Result files written whole or not at all, and read back with a check.

Every file a command writes for later reading (config.json, evaluation JSON and plots, reports,
results.json, compile_report.json, run records) goes through `write_atomic`: the bytes go to a
temporary file in the same directory, are flushed to disk (fsync), and the temporary file is
renamed over the target (`os.replace`, atomic on POSIX within one filesystem), then the directory
is synced so the rename itself survives a crash. A reader therefore sees the old file or the new
one, never a cut-off one; a failed write (disk full, quota, permissions) leaves the old file as it
was and removes its temporary file.

The readers say what they found: `read_json` returns None for a missing, cut-off or non-object
file (the caller redoes what it came from), `read_jsonl` drops a torn last line (a process killed
mid-write of metrics.jsonl) and `cut_jsonl` keeps the rows up to a step (a resumed run writes the
steps after its checkpoint again, so the rows after it are dropped first).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


def _sync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside `path` to write; on success it replaces `path`.

    For writers that want a file name (matplotlib's savefig); the temporary file keeps the
    target's extension, so a format inferred from the name stays the same."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _sync_dir(directory)


def write_atomic(path: str, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename."""
    payload = data.encode() if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def write_json_atomic(path: str, obj, **dump_kwargs) -> None:
    """`json.dump(obj)` to `path`, atomically (a trailing newline; `dump_kwargs` as json.dumps)."""
    write_atomic(path, json.dumps(obj, **dump_kwargs) + "\n")


def save_figure_atomic(fig, path: str, **savefig_kwargs) -> None:
    """`fig.savefig(path)` through a temporary file and a rename."""
    fmt = savefig_kwargs.pop("format", None) or os.path.splitext(path)[1].lstrip(".") or None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)


def check_writable(directory: str) -> None:
    """Create `directory` if needed and write (then remove) a small file in it; OSError if either
    fails, so a command can stop before its work rather than after."""
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, ".write_check"), b"ok\n")
    os.remove(os.path.join(directory, ".write_check"))


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable, cut off or not an
    object (the caller redoes whatever wrote it)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSON-lines file, one a line; a line that does not parse (a write cut
    off by a kill, always the last) is dropped. [] for a missing file."""
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return rows
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def cut_jsonl(path: str, last_step: int) -> int:
    """Keep the rows of `path` whose "step" is at most `last_step` (a torn line goes too),
    rewriting it atomically when anything changes; returns the number of lines dropped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return 0
    kept, dropped = [], 0
    for line in text.split("\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("step", 0)) <= last_step
        except (ValueError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped or (text and not text.endswith("\n")):  # the next row must start a line
        write_atomic(path, "".join(line + "\n" for line in kept))
    return dropped
