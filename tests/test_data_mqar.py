"""MQAR generator: answers recoverable from the context, labels only at answers, power-law gaps,
train/test lengths, and its errors."""

from __future__ import annotations

import ml_collections as mlc
import numpy as np
import pytest

from ttt import data
from ttt.data.mqar import check_mqar, make_mqar_fn

CFG = dict(name="mqar", vocab_size=64, seq_len=48, num_kv_pairs=6, test_seq_len=96,
           num_train_examples=256, num_test_examples=20)


def _batches(cfg, split, n, bs=8, seed=0):
    it = data.make_dataset(mlc.ConfigDict(cfg), split, bs, seed=seed).iterator()
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_brute_force_lookup_solves_every_example(split):
    batches = _batches(CFG, split, 2)
    n = CFG["seq_len"] if split == "train" else CFG["test_seq_len"]
    k = CFG["num_kv_pairs"]
    for b in batches:
        assert b["inputs"].shape == (8, n) and b["mask"].shape == (8, n)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        real = b["mask"].sum(1) > 0  # the last validation batch may carry padding rows
        assert (b["mask"].sum(1)[real] == k).all(), "exactly K answer positions per example"
        pred = data.brute_force_answers(b["inputs"], b["mask"])
        on = b["mask"] > 0
        assert (pred[on] == b["targets"][on]).all(), "lookup must solve 100%"
        # keys from the lower half (never 0), values from the upper half
        assert (b["inputs"][on] >= 1).all() and (b["inputs"][on] < 32).all()
        assert (b["targets"][on] >= 32).all() and (b["targets"][on] < 64).all()


def test_negative_control_scrambled_context_fails_lookup():
    b = _batches(CFG, "train", 1)[0]
    k = CFG["num_kv_pairs"]
    broken = b["inputs"].copy()
    # rotate the values inside the context so every key points at another pair's value
    broken[:, 1 : 2 * k : 2] = np.roll(broken[:, 1 : 2 * k : 2], 1, axis=1)
    pred = data.brute_force_answers(broken, b["mask"])
    on = b["mask"] > 0
    assert (pred[on] == b["targets"][on]).mean() < 0.2


def test_power_law_gaps_favour_short_distances():
    fn = make_mqar_fn(0, "train", vocab_size=512, seq_len=512, num_kv_pairs=8, power_a=0.01)
    slot = []
    for i in range(200):
        ex = fn(i)
        pos = np.nonzero(ex["mask"])[0]
        slot.append((pos - 16) // 2)  # query slot index after the 2K-token context
    slot = np.concatenate(slot)
    slots = (512 + 1 - 16) // 2
    assert (slot < slots // 4).mean() > 0.5  # uniform gaps would put 25% there
    uniform = make_mqar_fn(0, "train", 512, 512, 8, power_a=1.0)
    u = np.concatenate([(np.nonzero(uniform(i)["mask"])[0] - 16) // 2 for i in range(200)])
    assert 0.15 < (u < slots // 4).mean() < 0.35


def test_examples_are_seeded_and_splits_differ():
    a = make_mqar_fn(3, "train", 64, 32, 4)
    b = make_mqar_fn(3, "train", 64, 32, 4)
    c = make_mqar_fn(4, "train", 64, 32, 4)
    d = make_mqar_fn(3, "validation", 64, 32, 4)
    np.testing.assert_array_equal(a(5)["inputs"], b(5)["inputs"])
    assert not np.array_equal(a(5)["inputs"], c(5)["inputs"])
    assert not np.array_equal(a(5)["inputs"], d(5)["inputs"])
    meta_train = data.meta(mlc.ConfigDict(CFG), "train")
    meta_test = data.meta(mlc.ConfigDict(CFG), "validation")
    assert (meta_train["seq_len"], meta_test["seq_len"]) == (48, 96)


def test_validation_split_is_finite_and_padded():
    batches = list(data.make_dataset(mlc.ConfigDict(CFG), "validation", 8, seed=0).iterator())
    assert len(batches) == 3  # 20 examples -> 8 + 8 + 4 real rows
    assert batches[-1]["mask"].sum(1).tolist() == [6] * 4 + [0] * 4


def test_size_errors():
    with pytest.raises(data.DataConfigError, match="vocab_size"):
        check_mqar(16, 64, 8)
    with pytest.raises(data.DataConfigError, match="seq_len >= 31"):
        check_mqar(64, 16, 8)
    check_mqar(18, 31, 8)  # the boundary itself fits
    fn = make_mqar_fn(0, "train", 18, 31, 8)
    ex = fn(0)
    pred = data.brute_force_answers(ex["inputs"][None], ex["mask"][None])[0]
    assert (pred[ex["mask"] > 0] == ex["targets"][ex["mask"] > 0]).all()


def test_batches_are_the_examples_of_their_indices():
    """A batch drawn at once holds exactly the examples of its indices, whatever the order or
    the company (so shuffling, sharding and resuming see the same examples)."""
    from ttt.data.mqar import mqar_batch, split_id

    sizes = (64, 48, 6)
    fn = make_mqar_fn(5, "train", *sizes)
    idx = np.array([17, 3, 99, 3, 4_000_000_000])
    batch = mqar_batch(5, split_id("train"), idx, *sizes)
    for row, i in enumerate(idx):
        for key in ("inputs", "targets", "mask"):
            np.testing.assert_array_equal(batch[key][row], fn(int(i))[key])
    again = mqar_batch(5, split_id("train"), idx[::-1], *sizes)
    np.testing.assert_array_equal(again["inputs"][::-1], batch["inputs"])
    assert not np.array_equal(batch["inputs"][0], batch["inputs"][2])  # other index, other row


def test_counter_based_draws_have_the_intended_law():
    """Keys, values and filler are uniform over their ranges; key and value sets are distinct;
    slots follow the power law (mean gap far below uniform's); a uniform law for power_a=1."""
    from ttt.data.mqar import mqar_batch

    V, N, K = 64, 64, 8
    b = mqar_batch(0, 0, np.arange(4000), V, N, K)
    keys, values = b["inputs"][:, 0:2 * K:2], b["inputs"][:, 1:2 * K:2]
    assert all(len(set(r)) == K for r in keys) and all(len(set(r)) == K for r in values)
    counts = np.bincount(keys.ravel(), minlength=V)[1:V // 2]  # 31 possible keys
    expected = keys.size / (V // 2 - 1)
    assert ((counts - expected) ** 2 / expected).sum() < 80  # chi² with 30 dof: mean 30
    filler = b["targets"][:, 2 * K:][b["mask"][:, 2 * K:] == 0]
    hist = np.bincount(filler, minlength=V)
    assert hist[: V // 2].sum() > 0.35 * filler.size  # filler covers the whole vocabulary
    # ... except the example's own keys and values: each key occurs exactly twice (context and
    # query), so the lookup has one answer
    used = np.concatenate([keys, values], axis=1)  # (B, 2K)
    answer_at = np.zeros(b["mask"].shape, bool)
    answer_at[:, 1:] = b["mask"][:, :-1] > 0
    filler_at = (b["mask"] == 0) & ~answer_at
    filler_at[:, : 2 * K] = False
    is_used = (b["inputs"][:, :, None] == used[:, None, :]).any(-1)  # (B, N)
    assert filler_at.sum() > 0.4 * b["mask"].size and not (is_used & filler_at).any()
    assert ((b["inputs"][:, :, None] == keys[:, None, :]).sum(1) == 2).all()
    slot = (np.nonzero(b["mask"])[1] - 2 * K) // 2
    slots = (N + 1 - 2 * K) // 2
    flat = mqar_batch(0, 0, np.arange(4000), V, N, K, power_a=1.0)
    uniform = (np.nonzero(flat["mask"])[1] - 2 * K) // 2
    assert slot.mean() < 0.8 * uniform.mean()
    assert abs(uniform.mean() - (slots - 1) / 2) < 0.5  # uniform slots average the middle


def test_train_mixture_of_pair_counts():
    """`train_num_kv_pairs`: example i of the train split holds counts[i mod len] pairs (still
    the example of its index, solvable by lookup); validation keeps num_kv_pairs; a bad list
    or a count that does not fit is one DataConfigError."""
    from ttt.data.mqar import mqar_mixed_batch, split_id

    cfg = dict(CFG, train_num_kv_pairs="2,4,6")
    counts = (2, 4, 6)
    batches = _batches(cfg, "train", 3)
    seen = set()
    for b in batches:
        k = b["mask"].sum(1).astype(int)
        seen.update(k.tolist())
        for row in range(len(k)):  # the first 2K inputs are the pairs, then no pair before a query
            assert b["inputs"][row, 0] < 32 <= b["inputs"][row, 1]
        on = b["mask"] > 0
        assert (data.brute_force_answers(b["inputs"], b["mask"])[on] == b["targets"][on]).all()
    assert seen == set(counts)
    assert (_batches(cfg, "validation", 1)[0]["mask"].sum(1) == 6).all()
    idx = np.array([7, 0, 5, 12, 3])
    mixed = mqar_mixed_batch(0, split_id("train"), idx, 64, 48, counts)
    for row, i in enumerate(idx):
        one = make_mqar_fn(0, "train", 64, 48, counts[i % 3])(int(i))
        np.testing.assert_array_equal(mixed["inputs"][row], one["inputs"])
        np.testing.assert_array_equal(mixed["mask"][row], one["mask"])
    for bad, match in (("2,x", "positive integers"), ("2,0", "num_kv_pairs >= 1"),
                       ("2,40", "vocab_size"), ("2,12,13", "seq_len >= 51")):
        with pytest.raises(data.DataConfigError, match=match):
            data.validate(mlc.ConfigDict(dict(cfg, train_num_kv_pairs=bad)))
