"""Pack a stream of token documents into fixed windows of `seq_len + 1` tokens.

Documents arrive already tokenized and EOS-terminated; they are concatenated and cut into
consecutive, non-overlapping windows. A window that straddles documents keeps both sides (the
model learns to reset after EOS). When a finite stream ends, the last partial window is padded
and its padded positions get mask 0; a remainder of fewer than two tokens yields no window.

The iterator state is `{"parent": <parent state before the oldest buffered document>,
"offset": <tokens of that document already emitted>}`: JSON-serialisable, and restoring it
replays exactly the windows that would have followed.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Parent yields (n_i,) int32 arrays; this yields {"tokens": (window,) int32, "length": int}.

    `length` is the number of real tokens at the start of the window (window unless padded).
    """

    def __init__(self, parent: grain.IterDataset, window: int, pad_id: int):
        super().__init__(parent)
        if window < 2:
            raise ValueError(f"window must be >= 2 tokens, got {window}")
        self._window = int(window)
        self._pad_id = int(pad_id)

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._window, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(window={self._window})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, window: int, pad_id: int):
        super().__init__(parent)
        self._window = window
        self._pad_id = pad_id
        # Buffered documents as [parent state before fetching it, tokens, first unused index].
        self._buffer: list[list[Any]] = []
        self._exhausted = False

    def _buffered(self) -> int:
        return sum(len(toks) - start for _, toks, start in self._buffer)

    def _fill(self) -> None:
        while not self._exhausted and self._buffered() < self._window:
            state = copy.deepcopy(self._parent.get_state())
            try:
                toks = np.asarray(next(self._parent), dtype=np.int32).reshape(-1)
            except StopIteration:
                self._exhausted = True
                break
            self._buffer.append([state, toks, 0])

    def __next__(self) -> dict[str, Any]:
        self._fill()
        total = self._buffered()
        if total < 2:  # nothing left that can supply an (input, target) pair
            self._buffer.clear()
            raise StopIteration
        out = np.full((self._window,), self._pad_id, dtype=np.int32)
        filled = 0
        while filled < self._window and self._buffer:
            _, toks, start = self._buffer[0]
            take = min(self._window - filled, len(toks) - start)
            out[filled : filled + take] = toks[start : start + take]
            filled += take
            if start + take == len(toks):
                self._buffer.pop(0)
            else:
                self._buffer[0][2] = start + take
        return {"tokens": out, "length": filled}

    def get_state(self) -> dict[str, Any]:
        if self._buffer:
            state, _, start = self._buffer[0]
            return {"parent": copy.deepcopy(state), "offset": int(start)}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._buffer.clear()
        self._exhausted = False
        offset = int(state["offset"])
        if offset:
            parent_state = copy.deepcopy(self._parent.get_state())
            toks = np.asarray(next(self._parent), dtype=np.int32).reshape(-1)
            self._buffer.append([parent_state, toks, offset])
