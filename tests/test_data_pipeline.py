"""Iteration: determinism given the seed, exact resume from a JSON round-tripped state,
disjoint process shards; image pipelines (embedded digits and tfds catalog via mock_data)."""

from __future__ import annotations

import json

import ml_collections as mlc
import numpy as np
import pytest
import tensorflow_datasets as tfds

from ttt import data

MOCK = dict(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE)

CONFIGS = {
    "text_corpus": dict(name="text_corpus", seq_len=16, shuffle_windows=16),
    "mqar": dict(name="mqar", vocab_size=32, seq_len=16, num_kv_pairs=2, num_train_examples=40),
    "digits": dict(name="digits"),
    "cifar10": dict(name="tfds_images", dataset="cifar10", image_size=16, randaug=(2, 10)),
}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def _with_mock(name):
    return tfds.testing.mock_data(**MOCK) if name == "cifar10" else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name", list(CONFIGS))
def test_deterministic_and_resumes_exactly(name, tmp_path):
    cfg = mlc.ConfigDict(dict(CONFIGS[name], data_dir=str(tmp_path)))
    with _with_mock(name):
        make = lambda seed: data.make_dataset(cfg, "train", 4, seed=seed)
        it = make(0).iterator()
        head = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
        tail = _take(it, 4)
        resumed = make(0).iterator()
        resumed.set_state(state)
        assert _same(_take(resumed, 4), tail), "resumed run must see the same batches"
        assert _same(_take(make(0).iterator(), 3), head), "same seed, same batches"
        assert not _same(_take(make(1).iterator(), 3), head), "another seed, other batches"


@pytest.mark.parametrize("name", ["mqar", "digits"])
def test_process_shards_are_disjoint_and_half_size(name):
    cfg = mlc.ConfigDict(CONFIGS[name])
    key = "inputs" if name == "mqar" else "images"
    rows = []
    for shard in range(2):
        ds = data.make_dataset(cfg, "validation", 8, seed=0, shard_index=shard, shard_count=2)
        b = next(ds.iterator())
        assert b[key].shape[0] == 4
        rows.append({r.tobytes() for r in b[key]})
    assert rows[0].isdisjoint(rows[1])


def test_digits_meta_and_ranges():
    cfg = mlc.ConfigDict(CONFIGS["digits"])
    assert data.meta(cfg) == {"num_classes": 10, "image_shape": (8, 8, 1)}
    val = list(data.make_dataset(cfg, "validation", 64, seed=0).iterator())
    images = np.concatenate([b["images"] for b in val])
    mask = np.concatenate([b["mask"] for b in val])
    assert mask.sum() == 300 and len(val) == 5  # 300 validation digits, last batch padded
    assert images.min() >= -1 and images.max() <= 1 and images[mask > 0].std() > 0.3
    labels = np.concatenate([b["labels"] for b in val])[mask > 0]
    assert set(labels.tolist()) == set(range(10))


@pytest.mark.parametrize("dataset,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_images_with_mock_data(dataset, shape, tmp_path):
    cfg = mlc.ConfigDict(dict(name="tfds_images", dataset=dataset, data_dir=str(tmp_path),
                              randaug=(2, 15)))
    with tfds.testing.mock_data(**MOCK):
        data.validate(cfg)
        m = data.meta(cfg)
        train = next(data.make_dataset(cfg, "train", 4, seed=0).iterator())
        evals = list(data.make_dataset(cfg, "test", 5, seed=0).iterator())
        pixels = mlc.ConfigDict(dict(cfg.to_dict(), pixels=True))
        plain = next(data.make_dataset(pixels, "train", 4, seed=0).iterator())
    assert m == {"num_classes": 10, "image_shape": shape}
    assert train["images"].shape == (4, *shape) and train["images"].dtype == np.float32
    assert train["labels"].dtype == np.int32 and train["labels"].max() < 10
    # mixup is the train step's (config.train.mixup_alpha); the pipeline refuses data.mixup
    assert "soft_labels" not in train and "soft_labels" not in plain
    mixed = mlc.ConfigDict(dict(cfg.to_dict(), mixup=0.2))
    for call in (lambda: data.validate(mixed),
                 lambda: data.make_dataset(mixed, "train", 4, seed=0)):
        with pytest.raises(data.DataConfigError, match=r"train\.mixup_alpha=0\.2") as err:
            call()
        assert "\n" not in str(err.value)
    assert sum(int(b["mask"].sum()) for b in evals) == 24  # every example once
    assert all(-1 <= b["images"].min() and b["images"].max() <= 1 for b in evals)


def test_inception_crop_box_stays_inside():
    from ttt.data.images import eval_geometry, inception_crop_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = inception_crop_box(rng, 30, 50)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        assert h * w >= 0.04 * 30 * 50
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 20:40] = 255  # a bright centre column band survives the centre crop
    out = np.asarray(eval_geometry(img, 20, crop_frac=1.0))
    assert out.shape == (20, 20, 3) and out[:, 10].min() > 200 and out[:, 0].max() < 50


def test_digits_match_sklearn_loader():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    from ttt.data.images import digits

    ref = load_digits()
    x = np.concatenate([digits("train")[0], digits("validation")[0]])[..., 0]  # (1797, 8, 8)
    y = np.concatenate([digits("train")[1], digits("validation")[1]])
    order = np.random.default_rng(0).permutation(len(ref.target))
    np.testing.assert_allclose(x, ref.images[order] / 8.0 - 1.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y, ref.target[order])


def test_index_batches_cover_each_epoch_once():
    from ttt.data.pipeline import _index_batches

    ds = _index_batches(10, 4, seed=0, train=True)
    stream = np.concatenate([ds[b] for b in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:]), "reshuffled each epoch"
    ev = _index_batches(10, 4, seed=0, train=False)
    assert [ev[b].tolist() for b in range(len(ev))] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
