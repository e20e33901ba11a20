"""Repeated spans: text windows whose far context matters by construction.

A long-context probe. Every packed window of `seq_len + 1` tokens gets spans of `span` tokens
copied from earlier in the same window to later places, at a distance D (destination start minus
source start) drawn log-uniformly from [min_distance, max_distance] — so each octave of distance
(16-32, 32-64, ...) gets about as many copies. A model that can look D tokens back predicts a
copied token almost for free once it has seen the first few tokens of the copy; a model that
forgets beyond some horizon cannot. The loss by distance on copied tokens, against the loss on
the window's own text, shows where a mixer's memory ends.

Notable choices
- Placement: `round(fraction * length / span)` destinations (as many as fit), non-overlapping and
  uniformly random among such placements (sorted offsets in the free room, "stars and bars"),
  each at least `min_distance` into the window so a source always exists. A destination's
  distance is capped by its own position (the source must start inside the window).
- Exact copies: copies are written in order of destination, each as a chain of D-token chunks,
  through an index map into the original window. So `out[p] == out[p - distance[p]]` holds for
  every copied position, also when a copy's source overlaps an earlier copy (a copy of a copy) or
  its own destination (D < span: the span then repeats with period D, as in LZ77).
- Labels per window position: `distance` (D, 0 for the window's own text) and `offset` (the
  position's 1-based place in its copied span, 0 for own text). The pipeline shifts both to the
  targets. The first token of a copy (offset 1) follows own text, so nothing yet says a copy has
  begun; `summarize` scores copies from offset `skip + 1` on and reports the skipped ones apart.
- The LM loss is unchanged (every token scores, copied or not); the labels only serve the probe.
- Randomness comes from the numpy Generator that grain's `random_map` hands each window (seeded,
  counter-based and part of the iterator state), so the windows are deterministic and resumable.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ttt.data.errors import DataConfigError


class Repeats(NamedTuple):
    """What to copy: the share of a window's tokens that are copies, the span length and the
    distance range (tokens from a span's source start to its destination start)."""

    fraction: float
    span: int
    min_distance: int
    max_distance: int


def settings(fraction, span, min_distance, max_distance, seq_len: int) -> Repeats | None:
    """Checked `Repeats` from the data config's values (None entries take the defaults: span 16,
    min_distance = span, max_distance = seq_len), or None when fraction is 0 (no copies)."""
    fraction = float(fraction or 0.0)
    if fraction == 0.0:
        return None
    if not 0.0 < fraction < 1.0:
        raise DataConfigError(f"data.repeats={fraction} must be in [0, 1): the share of each "
                              "window's tokens that are copies (0 turns copies off)")
    span = int(span or 16)
    lo = int(min_distance or span)
    hi = int(max_distance or seq_len)
    if span < 2:
        raise DataConfigError(f"data.repeat_span={span} must be at least 2 tokens")
    if not 1 <= lo <= hi:
        raise DataConfigError(f"data.repeat_min_distance={lo} and repeat_max_distance={hi} must "
                              "satisfy 1 <= min <= max")
    if lo + span > seq_len + 1:
        raise DataConfigError(f"data.seq_len={seq_len} is too short for one copy of repeat_span="
                              f"{span} at repeat_min_distance={lo}: lower them or raise seq_len")
    return Repeats(fraction, span, lo, hi)


def copy_spans(tokens: np.ndarray, length: int, rng: np.random.Generator,
               rep: Repeats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W,) window with `length` real tokens -> (tokens, distance, offset), each (W,).

    Copies only within the real tokens; padding keeps distance 0. See the module docstring."""
    W = tokens.shape[0]
    distance = np.zeros(W, np.int32)
    offset = np.zeros(W, np.int32)
    room = length - rep.min_distance  # where destinations may lie: [min_distance, length)
    k = min(int(round(rep.fraction * length / rep.span)), max(room, 0) // rep.span)
    if k < 1:
        return tokens, distance, offset
    free = room - k * rep.span
    starts = rep.min_distance + rep.span * np.arange(k) + np.sort(rng.integers(0, free + 1, k))
    hi = np.minimum(rep.max_distance, starts)  # (k,) a source must start at >= 0
    u = rng.uniform(size=k)
    log_lo = math.log(rep.min_distance)
    dist = np.floor(np.exp(log_lo + u * (np.log(hi + 1.0) - log_lo))).astype(np.int64)
    dist = np.clip(dist, rep.min_distance, hi)  # (k,)
    index = np.arange(W)  # out[p] = tokens[index[p]]
    for d, D in zip(starts.tolist(), dist.tolist(), strict=True):
        for j in range(0, rep.span, D):  # chunks of D: each chunk's source is already final
            c = min(D, rep.span - j)
            index[d + j: d + j + c] = index[d + j - D: d + j - D + c]
        distance[d: d + rep.span] = D
        offset[d: d + rep.span] = np.arange(1, rep.span + 1)
    return tokens[index], distance, offset


def add_copies(rep: Repeats):
    """window dict -> window dict with copies and "repeat_distance", "repeat_offset" (W,), for
    grain's `random_map` (which passes the per-window Generator)."""

    def fn(window: dict, rng: np.random.Generator) -> dict:
        tokens, distance, offset = copy_spans(window["tokens"], int(window["length"]), rng, rep)
        return {**window, "tokens": tokens, "repeat_distance": distance, "repeat_offset": offset}

    return fn


# --------------------------------------------------------------------------- the probe's sums


def distance_edges(rep: Repeats, seq_len: int) -> np.ndarray:
    """Octave bin edges [2^a, 2^(a+1), ...] covering the distances a window of seq_len + 1
    tokens can hold: min_distance .. min(max_distance, seq_len + 1 - span)."""
    a = int(math.floor(math.log2(rep.min_distance)))
    b = int(math.floor(math.log2(min(rep.max_distance, seq_len + 1 - rep.span)))) + 1
    return 2 ** np.arange(a, b + 1)


def sums(nll: np.ndarray, mask: np.ndarray, distance: np.ndarray, offset: np.ndarray,
         edges: np.ndarray, span: int, skip: int = 1) -> dict[str, np.ndarray]:
    """Loss sums and token counts over one batch, all (B, N) -> per group:
    "bin" (len(edges) - 1,) copies at offset > skip by distance bin [edges[i], edges[i+1]),
    "bin_source_loss" the same tokens at their source (their first occurrence, with the same
    `skip` or more tokens before them: the paired baseline of each copy),
    "offset" (span,) copies by offset 1..span, "own" () the window's own text,
    "skipped" () copies at offset <= skip."""
    m = np.asarray(mask, np.float64)
    nll = np.asarray(nll, np.float64) * m
    copied = (distance > 0) & (m > 0)
    scored = copied & (offset > skip) & (np.arange(nll.shape[1]) >= distance)  # source in view
    rows = np.arange(nll.shape[0])[:, None]
    source_nll = nll[rows, np.maximum(np.arange(nll.shape[1]) - distance, 0)]  # (B, N)
    b = np.searchsorted(edges, distance, side="right") - 1  # (B, N) bin of each distance
    n_bins = len(edges) - 1
    out = {"bin_loss": np.zeros(n_bins), "bin_count": np.zeros(n_bins),
           "bin_source_loss": np.zeros(n_bins)}
    for i in range(n_bins):
        sel = scored & (b == i)
        out["bin_loss"][i], out["bin_count"][i] = nll[sel].sum(), sel.sum()
        out["bin_source_loss"][i] = source_nll[sel].sum()
    out["offset_loss"] = np.bincount(offset[copied] - 1, nll[copied], minlength=span)[:span]
    out["offset_count"] = np.bincount(offset[copied] - 1, minlength=span)[:span].astype(float)
    own = (distance == 0) & (m > 0)
    skipped = copied & ~scored
    out.update(own_loss=nll[own].sum(), own_count=own.sum(),
               skipped_loss=nll[skipped].sum(), skipped_count=skipped.sum())
    return out


def summarize(totals: dict, edges: np.ndarray) -> dict:
    """Summed `sums` -> mean losses (None where nothing was scored), JSON-ready."""

    def mean(loss, count):
        return None if count == 0 else float(loss / count)

    bins = [{"from": int(edges[i]), "to": int(edges[i + 1]),
             "loss": mean(totals["bin_loss"][i], totals["bin_count"][i]),
             "source_loss": mean(totals["bin_source_loss"][i], totals["bin_count"][i]),
             "tokens": int(totals["bin_count"][i])} for i in range(len(edges) - 1)]
    copied_loss = float(np.sum(totals["bin_loss"]))
    copied_count = float(np.sum(totals["bin_count"]))
    return {
        "own_loss": mean(totals["own_loss"], totals["own_count"]),
        "own_tokens": int(totals["own_count"]),
        "copied_loss": mean(copied_loss, copied_count),
        "copied_tokens": int(copied_count),
        "source_loss": mean(float(np.sum(totals["bin_source_loss"])), copied_count),
        "skipped_loss": mean(totals["skipped_loss"], totals["skipped_count"]),
        "skipped_tokens": int(totals["skipped_count"]),
        "by_distance": bins,
        "loss_by_offset": [mean(x, c) for x, c in zip(totals["offset_loss"],
                                                        totals["offset_count"], strict=True)],
    }
