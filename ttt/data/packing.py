"""Pack a stream of token documents into fixed windows of `seq_len + 1` tokens.

Documents arrive already tokenized and EOS-terminated; grain's `ConcatThenSplitIterDataset`
concatenates them and cuts the stream into consecutive, non-overlapping windows (with
`split_full_length_features=True` a full-length document is cut like any other, so the windows
are exactly those of the plain concatenation). A window that straddles documents keeps both
sides (the model learns to reset after EOS). When a finite stream ends, the last partial window
is padded with `pad_id` and its `length` says how many tokens are real; a remainder of fewer than
two tokens (no input/target pair) is dropped. The iterator state is grain's: JSON-serialisable,
and restoring it replays exactly the windows that would have followed (after one fix-up:
`_TupleSlices`).
"""

from __future__ import annotations

import grain
import grain.experimental as gex
import numpy as np


class _TupleSlices(grain.IterDataset):
    """grain's ConcatThenSplit state holds (start, end) tuples and compares them with a tuple
    sentinel; a JSON round trip (our checkpoints) turns them into lists, which would then restore
    the wrong windows. This pass-through turns them back into tuples on `set_state`."""

    def __iter__(self) -> _TupleSlicesIterator:
        return _TupleSlicesIterator(self._parent.__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


def pack_windows(parent: grain.IterDataset, window: int, pad_id: int) -> grain.IterDataset:
    """Parent yields (n_i,) int arrays; the result yields {"tokens": (window,) int32, "length"}.

    `length` is the number of real tokens at the start of the window (window unless padded).
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 tokens, got {window}")
    docs = parent.map(lambda toks: {"tokens": np.asarray(toks, np.int32).reshape(-1)})
    packed = _TupleSlices(gex.ConcatThenSplitIterDataset(docs, length_struct={"tokens": window},
                                                         split_full_length_features=True))

    def finish(w: dict) -> dict:
        # Real tokens have segment id >= 1; only the stream's last window has padding (id 0).
        length = int(np.count_nonzero(w["tokens_segment_ids"]))
        tokens = np.where(np.arange(window) < length, w["tokens"], pad_id).astype(np.int32)
        return {"tokens": tokens, "length": length}

    return packed.map(finish).filter(lambda w: w["length"] >= 2)
