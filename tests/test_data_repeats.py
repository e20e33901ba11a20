"""Copied spans (`ttt.data.repeats`, `data.repeats` on the text pipelines) and the long-context
probe (`experiments.long_context`): exact copies, distances in range, the labels' alignment with
the targets, determinism and resume, the probe's sums, and a tiny softmax LM that learns to copy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import rel_err

import ttt.evaluate
import ttt.main
from experiments import lm, long_context
from ttt.cli import apply_overrides
from ttt.data import DataConfigError, make_dataset, validate
from ttt.data import repeats as rp


def _copies_exact(out, distance) -> bool:
    """Every copied position holds the token `distance` places back."""
    p = np.nonzero(distance > 0)[0]
    return bool(np.all(out[p] == out[p - distance[p]]))


@pytest.mark.parametrize("span,lo,hi", [(16, 16, 512), (8, 3, 40), (32, 16, 200)])
def test_copies_are_exact_and_in_range(span, lo, hi):
    rep = rp.Repeats(0.3, span, lo, hi)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, 1000, 513).astype(np.int32)  # distinct enough to tell copies
        length = 513 if seed % 2 else 400  # a padded last window copies within its real tokens
        out, distance, offset = rp.copy_spans(tokens, length, np.random.default_rng(seed), rep)
        assert _copies_exact(out, distance)
        own = distance == 0
        assert np.array_equal(out[own], tokens[own])  # own text untouched
        assert np.all(offset[own] == 0) and not np.any(distance[length:])
        d = distance[~own]
        assert d.min() >= lo and d.max() <= hi
        # spans: runs of offsets 1..span, one distance each; the copied share ~ the fraction
        starts = np.nonzero(offset == 1)[0]
        k = min(round(0.3 * length / span), (length - lo) // span)
        assert len(starts) == k and (~own).sum() == k * span
        for s in starts:
            assert np.array_equal(offset[s: s + span], np.arange(1, span + 1))
            assert np.all(distance[s: s + span] == distance[s]) and s >= distance[s]
        # negative control: a copy label one place off is caught
        wrong = distance.copy()
        wrong[starts[-1] + 1: starts[-1] + span] += 1
        assert not _copies_exact(out, wrong)


def test_short_distances_repeat_with_period_and_long_ones_are_log_uniform():
    rep = rp.Repeats(0.25, 16, 4, 4)  # D = 4 < span: the copy repeats its first 4 tokens
    out, distance, offset = rp.copy_spans(np.arange(200), 200, np.random.default_rng(0), rep)
    s = int(np.nonzero(offset == 1)[0][0])
    assert np.array_equal(out[s: s + 16], np.tile(np.arange(s - 4, s), 4))
    # D log-uniform on [16, 512]: each octave about equally likely for destinations past 512
    rep = rp.Repeats(0.05, 16, 16, 512)
    d = np.concatenate([rp.copy_spans(np.zeros(4097, np.int32), 4097, np.random.default_rng(i),
                                      rep)[1] for i in range(200)])
    first = d[d > 0][::16]
    share = np.histogram(first, bins=[16, 32, 64, 128, 256, 513])[0] / len(first)
    assert np.all(share > 0.15) and np.all(share < 0.25), share


def _cfg(**kw):
    return {"name": "text_corpus", "tokenizer": "byte", "seq_len": 64, "repeats": 0.3,
            "repeat_span": 8, "repeat_min_distance": 4, **kw}


def test_batches_carry_labels_aligned_with_the_targets():
    plain = next(make_dataset(_cfg(repeats=0.0), "train", 8, seed=3).iterator())
    batch = next(make_dataset(_cfg(), "train", 8, seed=3).iterator())
    assert set(plain) == {"inputs", "targets", "mask"}
    assert set(batch) == set(plain) | {"repeat_distance", "repeat_offset"}
    for key in batch:
        assert batch[key].shape == (8, 64)
    assert batch["repeat_distance"].dtype == batch["repeat_offset"].dtype == np.int32
    assert np.array_equal(batch["mask"], plain["mask"])  # the LM loss still scores every token
    d, o, tgt, inp = (batch[k] for k in ("repeat_distance", "repeat_offset", "targets", "inputs"))
    own = d == 0
    assert np.array_equal(tgt[own], plain["targets"][own])  # the same windows, copies added
    assert not np.array_equal(tgt, plain["targets"])
    rows, t = np.nonzero(o >= 2)  # a copied target whose input is a copy too
    assert len(rows) > 0
    assert np.array_equal(tgt[rows, t], tgt[rows, t - d[rows, t]])
    assert np.array_equal(inp[rows, t], inp[rows, t - d[rows, t]])
    assert abs((~own).mean() - 0.3) < 0.05


def test_deterministic_and_resumable():
    ds = make_dataset(_cfg(), "train", 4, seed=5)
    a, b = ds.iterator(), make_dataset(_cfg(), "train", 4, seed=5).iterator()
    for _ in range(3):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    state = json.loads(json.dumps(a.get_state()))  # as a checkpoint stores it
    after = [next(a) for _ in range(3)]
    c = ds.iterator()
    c.set_state(state)
    for want in after:
        got = next(c)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    other = next(make_dataset(_cfg(), "train", 4, seed=6).iterator())
    assert not np.array_equal(other["repeat_distance"], next(ds.iterator())["repeat_distance"])


def test_validation_split_runs_once_and_pads_without_copies():
    batches = list(make_dataset(_cfg(seq_len=1024), "validation", 64, seed=0).iterator())
    last = batches[-1]
    pad = last["mask"].sum(1) == 0
    assert pad.any() and not last["repeat_distance"][pad].any()
    for b in batches:
        assert np.all(b["repeat_distance"][b["mask"] == 0] == 0)


@pytest.mark.parametrize("cfg,words", [
    (_cfg(repeats=1.5), "data.repeats=1.5 must be in [0, 1)"),
    (_cfg(repeat_span=1), "repeat_span=1 must be at least 2"),
    (_cfg(repeat_min_distance=70), "min <= max"),
    (_cfg(repeat_min_distance=60), "too short for one copy"),
    ({"name": "mqar", "vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4, "repeats": 0.2},
     "copied spans apply to the text pipelines"),
])
def test_bad_settings_are_refused_in_one_line(cfg, words):
    for call in (lambda: validate(cfg), lambda: make_dataset(cfg, "train", 8, seed=0)):
        with pytest.raises(DataConfigError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)


def test_probe_sums_partition_the_tokens_and_bin_by_distance():
    rep = rp.Repeats(0.4, 8, 4, 60)
    edges = rp.distance_edges(rep, 64)  # distances up to 65 - 8 = 57
    assert list(edges) == [4, 8, 16, 32, 64]
    assert list(rp.distance_edges(rep, 39)) == [4, 8, 16, 32, 64]  # up to 32
    assert list(rp.distance_edges(rep, 38)) == [4, 8, 16, 32]  # up to 31
    batch = next(make_dataset(_cfg(repeats=0.4), "validation", 8, seed=0).iterator())
    d, o, m = batch["repeat_distance"], batch["repeat_offset"], batch["mask"]
    nll = np.where(d > 0, np.log2(np.maximum(d, 1)), 7.0) + 0.01 * o  # known per-token losses
    s = rp.sums(nll, m, d, o, edges, rep.span, skip=2)
    total = s["bin_count"].sum() + s["skipped_count"] + s["own_count"]
    assert total == m.sum() and s["offset_count"].sum() == ((d > 0) & (m > 0)).sum()
    r = rp.summarize(s, edges)
    assert r["own_loss"] == pytest.approx(7.0)
    rows, t = np.nonzero((d > 0) & (o > 2) & (m > 0))  # the paired baseline, token by token
    at_source = nll[rows, t - d[rows, t]]
    assert rel_err(r["source_loss"], at_source.mean()) < 1e-12
    first = np.searchsorted(edges, d[rows, t], side="right") - 1 == 0
    assert rel_err(r["by_distance"][0]["source_loss"], at_source[first].mean()) < 1e-12
    for i, b in enumerate(r["by_distance"]):  # log2 D lies in [i + 2, i + 3) in bin i
        if b["tokens"]:
            assert i + 2 + 0.03 <= b["loss"] < i + 3 + 0.08
    assert r["loss_by_offset"][0] < r["loss_by_offset"][-1]  # offset adds 0.01 per place


def test_lm_token_switches_the_data():
    data = lm.get_config("softmax,cpu,repeats,ctx=256").data
    assert (data.repeats, data.repeat_span, data.repeat_min_distance,
            data.repeat_max_distance) == (0.5, 32, 16, 256)
    assert not lm.get_config("softmax,cpu").data.get("repeats")
    validate(data)
    # any text config takes the keys on the command line
    plain = apply_overrides(lm.get_config("softmax,cpu"), [("data.repeats", "0.5"),
                                                          ("data.repeat_span", "8")])
    assert (plain.data.repeats, plain.data.repeat_span) == (0.5, 8)
    validate(plain.data)
    # the probe scores a run trained on plain text with the token's copies
    probe = long_context.repeats_data_config(lm.get_config("softmax,cpu").data)
    assert (probe.repeats, probe.repeat_span, probe.repeat_max_distance) == (0.5, 32, 128)
    own = long_context.repeats_data_config(plain.data)
    assert (own.repeats, own.repeat_span) == (0.5, 8)  # a run's own settings are kept


def test_the_probe_splits_the_evaluated_loss(tmp_path, capsys):
    """On a 3-step run the probe's groups (own text, first tokens of copies, copies by distance)
    partition the scored tokens, and their weighted mean is `ttt.evaluate`'s loss on the same
    windows; several runs give one markdown table."""
    work = tmp_path / "run"
    assert ttt.main.main([f"--config={lm.__file__}:softmax,smoke,repeats", f"--workdir={work}",
                          "--config.model.num_layers=1", "--config.model.width=16",
                          "--config.train.steps=3", "--config.train.eval_every=0",
                          "--config.train.checkpoint_every=3",
                          "--config.train.progress=false"]) == 0
    assert ttt.evaluate.main([f"--workdir={work}", "--max_batches=2"]) == 0
    assert long_context.main(["--workdir", str(work), str(work), "--max_batches=2"]) == 0
    out = capsys.readouterr().out
    assert "| mixer | step | own text | first 1 of a copy |" in out
    whole = json.load(open(work / "eval" / "validation_max2.json"))
    r = json.load(open(work / "eval" / "long_context.json"))
    binned = sum(b["tokens"] for b in r["by_distance"])
    assert binned == r["copied_tokens"]
    assert r["own_tokens"] + r["skipped_tokens"] + binned == whole["tokens"]
    mean = (r["own_loss"] * r["own_tokens"] + r["skipped_loss"] * r["skipped_tokens"]
            + r["copied_loss"] * binned) / whole["tokens"]
    assert rel_err(mean, whole["loss"]) < 1e-5
    assert abs(r["copied_loss"] - r["own_loss"]) > 1e-4  # negative control: groups differ
    assert [b["from"] for b in r["by_distance"]] == [16, 32]  # 16 .. 65 - 16


@pytest.mark.slow  # ~4-8 min on a 2-core CPU: the documented softmax run of docs/results.md
def test_a_tiny_softmax_lm_copies_and_the_probe_reports_it(tmp_path, capsys):
    """The probe's softmax run (tiny LM, a short conv before each mixer, 800 steps at lr 1e-2):
    at step 200 it predicts copied tokens no better than their sources (negative control); at
    step 800 it copies, far better than at the sources in every distance bin."""
    work = tmp_path / "sm"
    args = [f"--config={lm.__file__}:softmax,cpu,repeats,ctx=256", f"--workdir={work}",
            "--config.model.pre_conv=True", "--config.train.steps=800",
            "--config.train.global_batch_size=16", "--config.optim.lr=0.01",
            "--config.train.eval_every=0", "--config.train.checkpoint_every=200",
            "--config.train.keep_checkpoints=4", "--config.train.progress=false"]
    assert ttt.main.main(args) == 0
    capsys.readouterr()
    results = {}
    for step in (200, 800):
        assert long_context.main([f"--workdir={work}", "--max_batches=8", "--skip=2",
                                  f"--step={step}"]) == 0
        results[step] = json.load(open(work / "eval" / "long_context.json"))
    assert "distance" in capsys.readouterr().out
    early, r = results[200], results[800]
    assert r["mixer"] == "softmax" and r["batches"] == 8 and r["copied_tokens"] > 10_000
    assert r["copied_loss"] < 0.5 * r["source_loss"], r  # measured 0.56 vs 1.48
    assert all(b["loss"] < 0.85 * b["source_loss"] for b in r["by_distance"]), r
    assert early["copied_loss"] > 0.95 * early["source_loss"], early  # 2.41 vs 2.44
