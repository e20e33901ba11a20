"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", Sec. 3).

A sequence of N + 1 tokens starts with `num_kv_pairs` key-value pairs `k_1 v_1 ... k_K v_K`
(keys distinct, from the lower half of the vocabulary, excluding 0; values distinct, from the
upper half). After the context every key is queried once: the key is placed at an even offset
after the context, chosen with power-law gaps P(g) ∝ g^(a - 1) (a = `power_a`, small a favours
short gaps), and followed by its value. The other positions hold random filler tokens (or 0).
The model sees `inputs = seq[:-1]` and is scored only where `targets = seq[1:]` is an answer, so
`mask` is 1 at exactly the K query-key positions.

Every example is a pure function of (seed, split, index), so any example can be regenerated and
the grain pipeline over example indices is deterministic and resumable.
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


def mqar_example(
    rng: np.random.Generator,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_filler: bool = True,
) -> dict[str, np.ndarray]:
    """One example: {"inputs", "targets", "mask"}, each (seq_len,); see the module docstring."""
    k = num_kv_pairs
    half = vocab_size // 2
    keys = rng.choice(np.arange(1, half), size=k, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=k, replace=False)
    context = np.stack([keys, values], axis=1).reshape(-1)  # (2K,) k1 v1 k2 v2 ...

    slots = (seq_len + 1 - 2 * k) // 2
    gaps = np.arange(1, slots + 1, dtype=np.float64)
    p = gaps ** (power_a - 1.0)
    # Weighted sampling of K distinct slots via Gumbel top-k (same law as sequential draws
    # without replacement, much faster than rng.choice(..., p=...)).
    scores = np.log(p) + rng.gumbel(size=slots)
    slot = np.argpartition(-scores, k - 1)[:k]  # (K,) distinct query slots

    if random_filler:
        seq = rng.integers(0, vocab_size, size=seq_len + 1)
    else:
        seq = np.zeros(seq_len + 1, dtype=np.int64)
    seq[: 2 * k] = context
    key_pos = 2 * k + 2 * slot  # (K,)
    seq[key_pos] = keys
    seq[key_pos + 1] = values
    mask = np.zeros(seq_len, dtype=np.float32)
    mask[key_pos] = 1.0  # the input at key_pos is the query; its target is the value
    return {
        "inputs": seq[:-1].astype(np.int32),
        "targets": seq[1:].astype(np.int32),
        "mask": mask,
    }


def make_mqar_fn(seed: int, split: str, vocab_size: int, seq_len: int, num_kv_pairs: int,
                 power_a: float = 0.01, random_filler: bool = True):
    """index -> example, seeded by (seed, split, index) so it is reproducible in any order."""
    split_id = _SPLIT_IDS.get(split, 2)

    def fn(index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([int(seed), split_id, int(index)])
        return mqar_example(rng, vocab_size, seq_len, num_kv_pairs, power_a, random_filler)

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
