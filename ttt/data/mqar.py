"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", Sec. 3).

A sequence of N + 1 tokens starts with `num_kv_pairs` key-value pairs `k_1 v_1 ... k_K v_K`
(keys distinct, from the lower half of the vocabulary, excluding 0; values distinct, from the
upper half). After the context every key is queried once: the key is placed at an even offset
after the context, chosen with power-law gaps P(g) ∝ g^(a - 1) (a = `power_a`, small a favours
short gaps), and followed by its value. The other positions hold random filler tokens (or 0),
drawn from the tokens that are not this example's keys or values: with a small vocabulary a
filler equal to a key would put a second, wrong "key value" pair in the sequence (at vocab 256
and 8 pairs about one per sequence), which keeps even softmax attention from learning the task
at some seeds (docs/design.md §13).
The model sees `inputs = seq[:-1]` and is scored only where `targets = seq[1:]` is an answer, so
`mask` is 1 at exactly the K query-key positions.

Every example is a pure function of (seed, split, index), so any example can be regenerated and
the grain pipeline over example indices is deterministic and resumable. Whole batches are drawn at
once (`mqar_batch`, counter-based hashing instead of one generator per example: ~0.3 ms instead of
~17 ms for 64 examples of 64 tokens), so the data never competes with a tiny model's train step.
"""

from __future__ import annotations

import numpy as np

from ttt.data.errors import DataConfigError

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 1}


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, what: str = "") -> None:
    """Raise a one-line DataConfigError when the sizes cannot hold an MQAR example."""
    k = num_kv_pairs
    if k < 1:
        raise DataConfigError(f"MQAR{what} needs num_kv_pairs >= 1, got {k}")
    if vocab_size // 2 - 1 < k:
        raise DataConfigError(
            f"MQAR{what} vocab_size={vocab_size} has only {vocab_size // 2 - 1} keys for "
            f"num_kv_pairs={k}: raise data.vocab_size to at least {2 * k + 2}"
        )
    # The context takes 2K tokens; the query region must fit K (key, value) slots.
    if (seq_len + 1 - 2 * k) // 2 < k:
        raise DataConfigError(
            f"MQAR{what} seq_len={seq_len} is too short for num_kv_pairs={k}: "
            f"needs seq_len >= {4 * k - 1}"
        )


# Counter-based randomness: every random number of an example is a hash of (seed, split, index,
# stream, position), so a whole batch of examples is drawn with a few vectorised numpy calls while
# each example stays a pure function of its index (any order, any batching, any sharding).
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a bijective scrambler."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(key: np.ndarray, stream: int, width: int) -> np.ndarray:
    """(B,) uint64 example keys -> (B, width) floats, uniform in the open interval (0, 1)."""
    pos = np.arange(width, dtype=np.uint64) + np.uint64(stream) * np.uint64(0x9E3779B97F4A7C15)
    x = _mix(_mix(key[:, None] ^ _mix(pos)[None, :]))  # (B, width)
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _example_keys(seed: int, split_id: int, indices: np.ndarray) -> np.ndarray:
    """(B,) uint64 hash of (seed, split, index) per example."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(int(seed) & (2**64 - 1)) * np.uint64(0xD1B54A32D192ED03)
                    + np.uint64(split_id))
        return _mix(np.asarray(indices, np.uint64) ^ base)


def _distinct(u: np.ndarray, k: int) -> np.ndarray:
    """(B, n) uniforms -> (B, k) distinct positions in 0..n-1, a uniformly random ordered subset
    per row (the k smallest scores, in order of their score)."""
    part = np.argpartition(u, k - 1, axis=1)[:, :k]  # (B, k) the k smallest, any order
    order = np.argsort(np.take_along_axis(u, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def mqar_batch(seed: int, split_id: int, indices, vocab_size: int, seq_len: int,
               num_kv_pairs: int, power_a: float = 0.01,
               random_filler: bool = True) -> dict[str, np.ndarray]:
    """Examples `indices` (B,) at once: {"inputs", "targets" (B, N) int32, "mask" (B, N) float32};
    see the module docstring. Row b depends only on (seed, split_id, indices[b])."""
    k = num_kv_pairs
    half = vocab_size // 2
    slots = (seq_len + 1 - 2 * k) // 2
    key = _example_keys(seed, split_id, np.atleast_1d(indices))
    B = key.shape[0]
    with np.errstate(over="ignore"):
        keys = 1 + _distinct(_uniform(key, 1, half - 1), k)  # (B, K) in 1..half-1
        values = half + _distinct(_uniform(key, 2, vocab_size - half), k)  # (B, K) in half..V-1
        # K distinct query slots with P(gap g) ∝ g^(a-1): Gumbel top-k (the same law as K
        # sequential weighted draws without replacement).
        gaps = np.arange(1, slots + 1, dtype=np.float64)
        gumbel = -np.log(-np.log(_uniform(key, 3, slots)))  # (B, slots)
        slot = _distinct(-((power_a - 1.0) * np.log(gaps)[None, :] + gumbel), k)  # (B, K)
        if random_filler:  # uniform over the tokens that are not this example's keys or values
            seq = (_uniform(key, 4, seq_len + 1) * (vocab_size - 2 * k)).astype(np.int64)
            used = np.sort(np.concatenate([keys, values], axis=1), axis=1)  # (B, 2K)
            for i in range(2 * k):  # rank r -> the r-th token outside `used`
                seq += seq >= used[:, i : i + 1]
        else:
            seq = np.zeros((B, seq_len + 1), np.int64)
    rows = np.arange(B)[:, None]
    seq[:, : 2 * k] = np.stack([keys, values], axis=2).reshape(B, 2 * k)  # k1 v1 k2 v2 ...
    key_pos = 2 * k + 2 * slot  # (B, K)
    seq[rows, key_pos] = keys
    seq[rows, key_pos + 1] = values
    mask = np.zeros((B, seq_len), np.float32)
    mask[rows, key_pos] = 1.0  # the input at key_pos is the query; its target is the value
    return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
            "mask": mask}


def pair_counts(spec) -> tuple[int, ...]:
    """A train split's pair counts: one int, a sequence of ints, or a comma-separated string
    ("4,8,16"); a one-line DataConfigError for anything else."""
    parts = spec.split(",") if isinstance(spec, str) else (
        [spec] if isinstance(spec, (int, np.integer)) else list(spec))
    try:
        counts = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        counts = ()
    if not counts or any(str(p).strip() != str(c) for p, c in zip(parts, counts, strict=True)):
        raise DataConfigError(
            f"MQAR pair counts must be positive integers, e.g. 4,8,16; got {spec!r}")
    return counts


def mqar_mixed_batch(seed: int, split_id: int, indices, vocab_size: int, seq_len: int,
                     counts: tuple[int, ...], power_a: float = 0.01,
                     random_filler: bool = True) -> dict[str, np.ndarray]:
    """`mqar_batch` where example i holds counts[i % len(counts)] pairs (Zoology's training
    mixture of pair counts: the small counts teach the lookup that the large one is scored on);
    still a pure function of (seed, split, index) per row."""
    indices = np.atleast_1d(np.asarray(indices))
    if len(counts) == 1:
        return mqar_batch(seed, split_id, indices, vocab_size, seq_len, counts[0], power_a,
                          random_filler)
    which = indices % len(counts)
    out = {}
    for j, k in enumerate(counts):
        rows = np.nonzero(which == j)[0]
        if rows.size == 0:
            continue
        part = mqar_batch(seed, split_id, indices[rows], vocab_size, seq_len, k, power_a,
                          random_filler)
        for name, x in part.items():
            out.setdefault(name, np.zeros((len(indices), *x.shape[1:]), x.dtype))[rows] = x
    return out


def mqar_example(rng: np.random.Generator, vocab_size: int, seq_len: int, num_kv_pairs: int,
                 power_a: float = 0.01, random_filler: bool = True) -> dict[str, np.ndarray]:
    """One example {"inputs", "targets", "mask"}, each (seq_len,), seeded by a draw of `rng`."""
    batch = mqar_batch(int(rng.integers(2**63)), 0, [0], vocab_size, seq_len, num_kv_pairs,
                       power_a, random_filler)
    return {name: x[0] for name, x in batch.items()}


def split_id(split: str) -> int:
    """The number a split's examples are seeded with (validation and test share theirs)."""
    return _SPLIT_IDS.get(split, 2)


def make_mqar_fn(seed: int, split: str, vocab_size: int, seq_len: int, num_kv_pairs: int,
                 power_a: float = 0.01, random_filler: bool = True):
    """index -> example (each (seq_len,)), seeded by (seed, split, index): `mqar_batch` of one."""
    sid = split_id(split)

    def fn(index: int) -> dict[str, np.ndarray]:
        batch = mqar_batch(seed, sid, [int(index)], vocab_size, seq_len, num_kv_pairs, power_a,
                           random_filler)
        return {name: x[0] for name, x in batch.items()}

    return fn


def brute_force_answers(inputs: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Solve MQAR by lookup: at each masked position t, answer the token that followed the first
    occurrence of inputs[t] in inputs[:t]. (B, N), (B, N) -> (B, N) int32 (0 where unmasked)."""
    inputs = np.asarray(inputs)
    out = np.zeros(inputs.shape, dtype=np.int32)
    for b, t in zip(*np.nonzero(np.asarray(mask) > 0), strict=True):
        hits = np.nonzero(inputs[b, :t] == inputs[b, t])[0]
        if hits.size and hits[0] + 1 < t:
            out[b, t] = inputs[b, hits[0] + 1]
    return out
