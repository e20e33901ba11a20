"""Text pipelines: packing and masks on known tokens, the local tfds builder, tokenizers,
the tfds catalog path (offline, via tfds.testing.mock_data) and one-line errors."""

from __future__ import annotations

import json

import grain
import ml_collections as mlc
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ttt import data
from ttt.data.packing import pack_windows
from ttt.data.tokenizers import ByteTokenizer

EOS = ByteTokenizer.eos_id


def _cfg(**kw):
    return mlc.ConfigDict(kw)


def _drain(it, limit=10_000):
    out = []
    for _, b in zip(range(limit), it, strict=False):
        out.append(b)
    return out


@pytest.mark.parametrize("window", [2, 4, 5, 16])
def test_pack_windows_match_concatenated_stream(window):
    docs = [np.array(d, np.int32) for d in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10])]
    stream = np.concatenate(docs)  # the reference: plain concatenation
    it = iter(pack_windows(grain.MapDataset.source(docs).to_iter_dataset(), window, pad_id=-1))
    windows = _drain(it)
    got = np.concatenate([w["tokens"][: w["length"]] for w in windows])
    np.testing.assert_array_equal(got[: len(stream)], stream)
    assert all(len(w["tokens"]) == window for w in windows)
    for w in windows[:-1]:
        assert w["length"] == window
    last = windows[-1]
    assert (last["tokens"][last["length"]:] == -1).all() and last["length"] >= 2
    # a window's length < 2 is dropped: with 10 tokens and window 3 the stray token vanishes
    it3 = iter(pack_windows(grain.MapDataset.source(docs).to_iter_dataset(), 3, pad_id=-1))
    assert [w["length"] for w in _drain(it3)] == [3, 3, 3]


def test_pack_state_resumes_mid_document():
    docs = [np.arange(i * 100, i * 100 + n, dtype=np.int32) for i, n in enumerate([7, 3, 11, 5])]
    ds = pack_windows(grain.MapDataset.source(docs).to_iter_dataset(), 4, pad_id=-1)
    ref = [w["tokens"] for w in _drain(iter(ds))]
    for k in range(len(ref)):
        it = iter(ds)
        _drain(it, k)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        it2 = iter(ds)
        it2.set_state(state)
        rest = [w["tokens"] for w in _drain(it2)]
        np.testing.assert_array_equal(np.stack(rest), np.stack(ref[k:]))


def _write_corpus(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_local_builder_roundtrip(tmp_path):
    files = {f"docs/part{i}/f{i}.txt": f"document {i}\n" * (i + 1) for i in range(12)}
    files["docs/.hidden.txt"] = "never read"
    _write_corpus(tmp_path, files)
    builder = data.build_local_corpus([tmp_path / "docs"], data_dir=str(tmp_path / "tfds"))
    assert builder.is_prepared()
    assert list((tmp_path / "tfds").rglob("*.array_record-*")), "array_record files written"
    # read back independently with tfds.data_source by name
    name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
    got = {}
    for split in ("train", "validation"):
        src = tfds.data_source(name, split=split, data_dir=str(tmp_path / "tfds"), download=False)
        for i in range(len(src)):
            got[src[i]["path"].decode()] = (split, src[i]["text"].decode())
    want = {f"docs/{k[5:]}": v for k, v in files.items() if ".hidden" not in k}
    assert {k: v[1] for k, v in got.items()} == want
    assert {v[0] for v in got.values()} == {"train", "validation"}, "both splits non-empty"
    # the same file set is not rebuilt; a changed file set gets a new config
    again = data.build_local_corpus([tmp_path / "docs"], data_dir=str(tmp_path / "tfds"))
    assert again.builder_config.name == builder.builder_config.name
    (tmp_path / "docs" / "new.txt").write_text("more")
    changed = data.build_local_corpus([tmp_path / "docs"], data_dir=str(tmp_path / "tfds"))
    assert changed.builder_config.name != builder.builder_config.name


def test_validation_split_packing_and_masks_on_known_tokens(tmp_path):
    lines = [f"line {i:02d} of a tiny corpus\n" for i in range(40)]  # 40 lines -> last 2 in val
    _write_corpus(tmp_path, {"one.txt": "".join(lines)})
    cfg = _cfg(name="text_files", paths=[str(tmp_path / "one.txt")],
               data_dir=str(tmp_path / "tfds"), seq_len=7)
    ds = data.make_dataset(cfg, "validation", 2, seed=0)
    assert ds.meta["vocab_size"] == 257 and ds.meta["seq_len"] == 7
    batches = _drain(ds.iterator())
    want = np.frombuffer("".join(lines[-2:]).encode(), np.uint8).astype(np.int32)
    want = np.append(want, EOS)  # one document, EOS-terminated
    toks, n_masked = [], 0
    for b in batches:
        assert b["inputs"].shape == (2, 7) and b["inputs"].dtype == np.int32
        assert b["mask"].dtype == np.float32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        for r in range(2):
            m = b["mask"][r]
            n = int(m.sum())
            assert (m[:n] == 1).all() and (m[n:] == 0).all(), "mask is a prefix"
            if n:
                toks.append(np.append(b["inputs"][r, :1], b["targets"][r, :n]))
            n_masked += n
    # 51 tokens = 6 full windows of 8 + one padded window of 3 + one all-padding batch row
    assert len(want) == 51 and len(batches) == 4
    assert batches[-1]["mask"][0].sum() == 2 and batches[-1]["mask"][1].sum() == 0
    stream = np.concatenate(toks)
    np.testing.assert_array_equal(stream, want)  # windows of seq_len + 1 tile the stream
    assert n_masked == len(want) - len(toks)  # one token per window is never a target


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = "".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(200))
    _write_corpus(tmp_path, {"c/a.txt": text, "c/b.txt": text.upper()})
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "c" / "a.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=48,
        eos_id=2, bos_id=1, unk_id=0, pad_id=-1, minloglevel=2)
    tok = data.make_tokenizer(str(tmp_path / "sp.model"))
    assert tok.vocab_size == 48 and tok.eos_id == 2
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    cfg = _cfg(name="text_files", paths=[str(tmp_path / "c" / "a.txt")],
               data_dir=str(tmp_path / "tfds"), seq_len=16, tokenizer=str(tmp_path / "sp.model"))
    assert data.meta(cfg)["vocab_size"] == 48
    b = next(data.make_dataset(cfg, "train", 2, seed=0).iterator())
    assert b["inputs"].max() < 48 and b["mask"].all()


def test_embedded_corpus_splits():
    train, val = data.embedded_corpus("train"), data.embedded_corpus("validation")
    assert len(train) > 100 and 0 < len(val) < len(train) / 5
    assert set(train._paths).isdisjoint(val._paths)
    b = next(data.make_dataset(_cfg(name="text_corpus", seq_len=32, shuffle_windows=8),
                               "train", 2, seed=0).iterator())
    assert b["inputs"].max() <= EOS and b["mask"].all()


def test_tfds_catalog_text_with_mock_data(tmp_path):
    cfg = _cfg(name="tfds_text", dataset="lm1b", data_dir=str(tmp_path), seq_len=8,
               shuffle_windows=4)
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        data.validate(cfg)
        train = next(data.make_dataset(cfg, "train", 2, seed=0).iterator())
        val = _drain(data.make_dataset(cfg, "validation", 2, seed=0).iterator())
    assert train["inputs"].shape == (2, 8) and train["mask"].all()
    assert len(val) >= 1 and val[-1]["mask"].shape == (2, 8)


def _one_line_error(cfg, *needles):
    with pytest.raises(data.DataConfigError) as e:
        data.validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_errors_are_one_line(tmp_path):
    _write_corpus(tmp_path, {"empty/a.txt": "", "short/a.txt": "tiny\n" * 3})
    _one_line_error(_cfg(name="nope"), "text_corpus", "mqar")
    _one_line_error(_cfg(name="tfds_text", dataset="no_such_dataset_xyz", seq_len=8,
                         data_dir=str(tmp_path)), "neither prepared")
    _one_line_error(_cfg(name="tfds_text", dataset="lm1b", seq_len=8,
                         data_dir=str(tmp_path / "nowhere")), "not prepared", "tfds build lm1b")
    _one_line_error(_cfg(name="text_files", paths=[str(tmp_path / "empty")], seq_len=8,
                         data_dir=str(tmp_path / "tfds")), "empty")
    _one_line_error(_cfg(name="text_files", paths=[str(tmp_path / "missing")], seq_len=8),
                    "does not exist")
    _one_line_error(_cfg(name="text_corpus", seq_len=8, tokenizer=str(tmp_path / "no.model")),
                    "tokenizer file", "'byte'")
    _one_line_error(_cfg(name="text_files", paths=[str(tmp_path / "short")], seq_len=64,
                         data_dir=str(tmp_path / "tfds")), "lower data.seq_len")
    with pytest.raises(data.DataConfigError, match="multiple"):
        data.make_dataset(_cfg(name="mqar", vocab_size=32, seq_len=16, num_kv_pairs=2),
                          "train", 3, seed=0, shard_count=2)
