"""`make_dataset`, `meta` and `validate`: one entry point for every data config.

Pipelines are grain datasets over random-access sources, so they are deterministic given the
seed, shard by process (`source[shard_index::shard_count]`), and resume exactly from
`iterator.get_state()` (a JSON-serialisable dict). Train splits shuffle and repeat forever;
validation splits run once, in order, and pad the last batch with mask-0 rows.

data_config.name and its keys (defaults in brackets):
  text_corpus  embedded stdlib text: seq_len, tokenizer ['byte' | path/to/sentencepiece.model]
  text_files   local files/folders: paths, data_dir [~/.cache/ttt/tfds], seq_len, tokenizer
  tfds_text    tfds catalog text: dataset ('lm1b', 'pg19', ...), data_dir, text_key [auto],
               splits [{'train': 'train', 'validation': 'validation' or 'test'}], seq_len, tokenizer
  mqar         vocab_size, seq_len, num_kv_pairs, test_seq_len [seq_len],
               test_num_kv_pairs [num_kv_pairs], train_num_kv_pairs [num_kv_pairs: one count,
               or several "4,8,16,32,64", example i holding the (i mod count)-th],
               power_a [0.01], random_filler [True],
               num_train_examples [100_000], num_test_examples [3_000]
  digits       embedded sklearn 8x8 digits (no augmentation)
  tfds_images  dataset ('imagenet2012', 'cifar10', 'mnist', ...), data_dir, image_size [native or
               224], flip [True], crop_frac [0.875 for variable-size images, else 1.0],
               pixels [False], randaug [None, e.g. (2, 15)], splits. Mixup is done in the train
               step (config.train.mixup_alpha), so data.mixup > 0 is refused.
Shared: shuffle_windows [1024, text], num_threads [2], prefetch [8].
Text only: repeats [0: off], repeat_span [16], repeat_min_distance [span], repeat_max_distance
  [seq_len] copy spans of each window to later places (`ttt.data.repeats`, a long-context probe);
  the batches then also hold "repeat_distance" and "repeat_offset" (B, N) int32 per target.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import grain.experimental as gex
import numpy as np

from ttt.data import images as img_lib
from ttt.data import repeats as repeats_lib
from ttt.data import text_sources
from ttt.data.errors import DataConfigError
from ttt.data.mqar import check_mqar, mqar_mixed_batch, pair_counts, split_id
from ttt.data.packing import pack_windows
from ttt.data.tokenizers import make_tokenizer

TEXT_NAMES = ("text_corpus", "text_files", "tfds_text")
NAMES = TEXT_NAMES + ("mqar", "digits", "tfds_images")
SPLITS = ("train", "validation", "test")


def _get(cfg, key: str, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _name(cfg) -> str:
    name = _get(cfg, "name")
    if name not in NAMES:
        raise DataConfigError(f"unknown data.name {name!r}: use one of {', '.join(NAMES)}")
    return name


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


def _seq_len(cfg, key: str = "seq_len") -> int:
    n = _get(cfg, key)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DataConfigError(f"data.{key} must be a positive integer, got {n!r}")
    return int(n)


def _tfds_split(cfg, split: str) -> list[str]:
    """Candidate tfds split names for our split, most preferred first."""
    mapping = _get(cfg, "splits", {}) or {}
    if split in mapping:
        return [mapping[split]]
    return ["train"] if split == "train" else ["validation", "test"]


def _open_tfds_split(cfg, split: str):
    name = _get(cfg, "dataset")
    if not name:
        raise DataConfigError("data.dataset is empty: set it to a tfds name, e.g. 'lm1b'")
    candidates = _tfds_split(cfg, split)
    for i, tfds_split in enumerate(candidates):
        try:
            return text_sources.open_tfds(name, tfds_split, _get(cfg, "data_dir"))
        except DataConfigError as e:
            if "has no split" not in str(e) or i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- meta


def meta(data_config, split: str = "train") -> dict[str, Any]:
    """The dataset's meta without building the pipeline.

    text/MQAR: {"vocab_size", "seq_len", ...}; images: {"num_classes", "image_shape" (H, W, C)}.
    """
    name = _name(data_config)
    _check_split(split)
    if name in TEXT_NAMES:
        tok = make_tokenizer(_get(data_config, "tokenizer", "byte"))
        vocab = max(tok.vocab_size, int(_get(data_config, "vocab_size", 0)))
        return {"vocab_size": vocab, "seq_len": _seq_len(data_config), "eos_id": tok.eos_id,
                "tokenizer": tok.name}
    if name == "mqar":
        # The test split may be longer / hold more pairs, to measure extrapolation.
        test = split != "train"
        len_key = "test_seq_len" if test and _get(data_config, "test_seq_len") else "seq_len"
        kv_key = ("test_num_kv_pairs" if test and _get(data_config, "test_num_kv_pairs")
                  else "num_kv_pairs")
        return {"vocab_size": int(_get(data_config, "vocab_size")),
                "seq_len": _seq_len(data_config, len_key),
                "num_kv_pairs": int(_get(data_config, kv_key))}
    if name == "digits":
        return {"num_classes": 10, "image_shape": (8, 8, 1)}
    builder = text_sources.tfds_builder(_get(data_config, "dataset"), _get(data_config, "data_dir"))
    features = builder.info.features
    shape = tuple(features["image"].shape)
    size = _get(data_config, "image_size") or (shape[0] if shape[0] else 224)
    return {"num_classes": int(features["label"].num_classes),
            "image_shape": (int(size), int(size), int(shape[-1]))}


# --------------------------------------------------------------------------- validation


def _stream_tokens(docs, tok, need: int, max_docs: int = 10_000) -> int:
    """Tokens (with one EOS per document) in `docs`, counting only until `need` is reached."""
    total = 0
    for i in range(min(len(docs), max_docs)):
        total += len(tok.encode(docs[i])) + 1
        if total >= need:
            break
    return total


def _text_docs(cfg, split: str):
    name = _get(cfg, "name")
    split = "validation" if split == "test" and name != "tfds_text" else split
    if name == "text_corpus":
        return text_sources.embedded_corpus(split)
    if name == "text_files":
        paths = _get(cfg, "paths")
        if not paths:
            raise DataConfigError("data.paths is empty: list text files or folders to train on")
        return text_sources.local_corpus(paths, split, _get(cfg, "data_dir"))
    source, builder = _open_tfds_split(cfg, split)
    return text_sources._Field(source, text_sources.text_feature(builder, _get(cfg, "text_key")))


def _check_text_split(cfg, split: str, tok, docs) -> None:
    window = _seq_len(cfg) + 1
    have = _stream_tokens(docs, tok, window)
    if have < window:
        raise DataConfigError(
            f"the {split} split of {_get(cfg, 'name')} holds only {have} tokens, fewer than one "
            f"window of seq_len + 1 = {window}: lower data.seq_len or add text"
        )


def repeat_settings(cfg) -> repeats_lib.Repeats | None:
    """The text pipelines' copied spans (None: off); refused on the other pipelines."""
    rep = _get(cfg, "repeats", 0.0)
    if rep and _get(cfg, "name") not in TEXT_NAMES:
        raise DataConfigError(f"data.repeats={rep}: copied spans apply to the text pipelines "
                              f"({', '.join(TEXT_NAMES)}); set data.repeats=0")
    return repeats_lib.settings(rep, _get(cfg, "repeat_span"), _get(cfg, "repeat_min_distance"),
                                _get(cfg, "repeat_max_distance"), _seq_len(cfg)) if rep else None


def _check_no_mixup(cfg) -> None:
    alpha = _get(cfg, "mixup", 0.0)
    if alpha:
        raise DataConfigError(
            f"data.mixup={alpha}: mixup is done in the train step, on the mixed labels; set "
            f"config.train.mixup_alpha={alpha} and leave data.mixup at 0")


def validate(data_config) -> None:
    """Raise a one-line DataConfigError for anything that would fail once training started:
    unknown name, missing dataset or files, empty corpus, missing tokenizer file, a seq_len
    longer than a split's whole token stream, MQAR sizes that cannot fit, data.mixup > 0."""
    name = _name(data_config)
    _check_no_mixup(data_config)
    repeat_settings(data_config)
    if name in TEXT_NAMES:
        tok = make_tokenizer(_get(data_config, "tokenizer", "byte"))
        _seq_len(data_config)
        for split in ("train", "validation"):
            _check_text_split(data_config, split, tok, _text_docs(data_config, split))
    elif name == "mqar":
        vocab = _get(data_config, "vocab_size")
        if not isinstance(vocab, (int, np.integer)):
            raise DataConfigError(f"data.vocab_size must be an integer, got {vocab!r}")
        for split in ("train", "validation"):
            m = meta(data_config, split)
            check_mqar(vocab, m["seq_len"], m["num_kv_pairs"], f" ({split})")
        for k in _train_pair_counts(data_config):
            check_mqar(vocab, _seq_len(data_config), k, " (train_num_kv_pairs)")
    elif name == "tfds_images":
        for split in ("train", "validation"):
            _image_source(data_config, split)
        meta(data_config)


# --------------------------------------------------------------------------- pipelines


class Dataset:
    """`.meta` (dict) and `.iterator()` -> grain DatasetIterator of numpy batches."""

    def __init__(self, ds: grain.IterDataset, meta_: dict[str, Any]):
        self._ds = ds
        self.meta = meta_

    def iterator(self) -> grain.DatasetIterator:
        return iter(self._ds)


def _pad_rows(batch: dict, rows: int) -> dict:
    """Pad a short final batch to `rows` with zero rows (their mask is 0)."""
    n = len(next(iter(batch.values())))
    if n == rows:
        return batch
    return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def _read_options(cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(_get(cfg, "num_threads", 2)),
                             prefetch_buffer_size=int(_get(cfg, "prefetch", 8)))


def _indexed(source, split, seed, shard_index, shard_count) -> grain.MapDataset:
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
        raise DataConfigError(
            f"the {split} split has {len(source)} records, too few for {shard_count} processes"
        )
    return ds.shuffle(seed=seed).repeat() if split == "train" else ds


def _index_batches(n: int, rows: int, seed: int, train: bool) -> grain.MapDataset:
    """Batches of indices into n records, vectorised (grain's per-element shuffle costs ~0.1 ms
    per element). Train: an endless stream through a fresh permutation per epoch (batches may
    straddle epochs); eval: 0..n-1 in order, the last batch short."""
    if not train:
        return grain.MapDataset.range((n + rows - 1) // rows).map(
            lambda b: np.arange(b * rows, min(n, (b + 1) * rows)))

    @functools.lru_cache(maxsize=2)
    def perm(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(n)

    def batch(b: int) -> np.ndarray:
        pos = b * rows + np.arange(rows)  # (rows,) global positions in the endless stream
        epoch, offset = pos // n, pos % n
        return np.array([perm(int(e))[o] for e, o in zip(epoch, offset, strict=True)]) \
            if epoch[0] != epoch[-1] else perm(int(epoch[0]))[offset]

    return grain.MapDataset.range(2**62).map(batch)


def _lm_batch(rows: int):
    def fn(packed: dict) -> dict:
        packed = _pad_rows(packed, rows)
        tokens, length = packed["tokens"], packed["length"]  # (B, N + 1), (B,)
        n = tokens.shape[1] - 1
        mask = (np.arange(1, n + 1)[None, :] < length[:, None]).astype(np.float32)  # (B, N)
        out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
        for key in ("repeat_distance", "repeat_offset"):  # labels of the targets
            if key in packed:
                out[key] = packed[key][:, 1:]
        return out

    return fn


def _text_dataset(cfg, split, rows, seed, shard_index, shard_count) -> Dataset:
    tok = make_tokenizer(_get(cfg, "tokenizer", "byte"))
    docs = _text_docs(cfg, split)
    _check_text_split(cfg, split, tok, docs)
    eos = np.asarray([tok.eos_id], np.int32)
    ds = _indexed(docs, split, seed, shard_index, shard_count)
    ds = ds.map(lambda doc: np.concatenate([tok.encode(doc), eos]))  # (n + 1,)
    it = ds.to_iter_dataset(_read_options(cfg))
    it = pack_windows(it, window=_seq_len(cfg) + 1, pad_id=tok.eos_id)
    if split == "train":
        # Windows of one document are adjacent in the stream; mix them across documents.
        it = gex.WindowShuffleIterDataset(it, window_size=int(_get(cfg, "shuffle_windows", 1024)),
                                          seed=seed + 1)
    rep = repeat_settings(cfg)
    if rep is not None:
        it = it.random_map(repeats_lib.add_copies(rep), seed=seed + 3)
    it = it.batch(rows, drop_remainder=split == "train").map(_lm_batch(rows))
    return Dataset(it, meta(cfg, split))


def _train_pair_counts(cfg) -> tuple[int, ...]:
    """The train split's MQAR pair counts (`train_num_kv_pairs`, default num_kv_pairs)."""
    return pair_counts(_get(cfg, "train_num_kv_pairs") or _get(cfg, "num_kv_pairs"))


def _mqar_dataset(cfg, split, rows, seed, shard_index, shard_count) -> Dataset:
    validate(cfg)
    m = meta(cfg, split)
    train = split == "train"
    count = int(_get(cfg, "num_train_examples" if train else "num_test_examples",
                     100_000 if train else 3_000))
    example_seed = seed if train else int(_get(cfg, "test_seed", 1234))
    counts = _train_pair_counts(cfg) if train else (m["num_kv_pairs"],)
    sizes = (m["vocab_size"], m["seq_len"], counts, float(_get(cfg, "power_a", 0.01)),
             bool(_get(cfg, "random_filler", True)))
    ids = np.arange(shard_index, count, shard_count)  # this process's example indices
    if len(ids) == 0:
        raise DataConfigError(
            f"the {split} split has {count} records, too few for {shard_count} processes")
    # Whole batches at once (`mqar_batch`): a per-example map costs ~0.3 ms per example.
    ds = _index_batches(len(ids), rows, seed, train).map(
        lambda i: mqar_mixed_batch(example_seed, split_id(split), ids[i], *sizes))
    if not train:
        ds = ds.map(lambda b: _pad_rows(b, rows))
    return Dataset(ds.to_iter_dataset(_read_options(cfg)), m)


def _image_source(cfg, split):
    if _get(cfg, "name") == "digits":
        return img_lib.ArraySource(*img_lib.digits("train" if split == "train" else "validation"))
    source, builder = _open_tfds_split(cfg, split)
    missing = {"image", "label"} - set(builder.info.features.keys())
    if missing:
        raise DataConfigError(
            f"tfds dataset {builder.name!r} has no {sorted(missing)} feature: "
            "data.name='tfds_images' needs 'image' and 'label'"
        )
    return source


def _image_dataset(cfg, split, rows, seed, shard_index, shard_count) -> Dataset:
    m = meta(cfg, split)
    size, _, channels = m["image_shape"]
    source = _image_source(cfg, split)
    train = split == "train"
    if _get(cfg, "name") == "digits":
        # No per-example preprocessing: gather whole batches at once.
        ids = np.arange(shard_index, len(source), shard_count)
        ds = _index_batches(len(ids), rows, seed, train).map(
            lambda i: {"images": source.images[ids[i]], "labels": source.labels[ids[i]],
                       "mask": np.ones(len(i), np.float32)})
        if not train:
            ds = ds.map(lambda b: _pad_rows(b, rows))
        return Dataset(ds.to_iter_dataset(_read_options(cfg)), m)
    ds = _indexed(source, split, seed, shard_index, shard_count)
    native = text_sources.tfds_builder(_get(cfg, "dataset"), _get(cfg, "data_dir"))
    fixed = native.info.features["image"].shape[0] is not None
    crop_frac = float(_get(cfg, "crop_frac", 1.0 if fixed else 0.875))
    pixels = bool(_get(cfg, "pixels", False))
    randaug = None if pixels else _get(cfg, "randaug")
    flip = bool(_get(cfg, "flip", True))

    def train_fn(r, rng):
        im = img_lib.train_geometry(r["image"], size, rng, flip)
        if randaug:
            im = img_lib.randaugment(im, rng, int(randaug[0]), float(randaug[1]))
        return {"images": img_lib.to_float(im, channels), "labels": np.int32(r["label"]),
                "mask": np.float32(1)}

    def eval_fn(r):
        im = img_lib.eval_geometry(r["image"], size, crop_frac)
        return {"images": img_lib.to_float(im, channels), "labels": np.int32(r["label"]),
                "mask": np.float32(1)}

    ds = ds.random_map(train_fn, seed=seed + 2) if train else ds.map(eval_fn)
    ds = ds.batch(rows, drop_remainder=train)
    if not train:
        ds = ds.map(lambda b: _pad_rows(b, rows))
    return Dataset(ds.to_iter_dataset(_read_options(cfg)), m)


def make_dataset(data_config, split: str, global_batch_size: int, *, seed: int,
                 shard_index: int = 0, shard_count: int = 1) -> Dataset:
    """Build the pipeline for `split` ('train', 'validation' or 'test').

    Each process gets global_batch_size // shard_count rows per batch:
    text/MQAR {"inputs", "targets" (B, N) int32, "mask" (B, N) float32} (text with data.repeats:
    also "repeat_distance", "repeat_offset" (B, N) int32);
    images {"images" (B, H, W, C) float32 in [-1, 1], "labels" (B,) int32, "mask" (B,) float32}.
    """
    name = _name(data_config)
    _check_no_mixup(data_config)
    repeat_settings(data_config)
    _check_split(split)
    if not 0 <= shard_index < shard_count:
        raise DataConfigError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise DataConfigError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the "
            f"{shard_count} processes"
        )
    rows = global_batch_size // shard_count
    args = (data_config, split, rows, int(seed), shard_index, shard_count)
    if name in TEXT_NAMES:
        return _text_dataset(*args)
    if name == "mqar":
        return _mqar_dataset(*args)
    return _image_dataset(*args)
