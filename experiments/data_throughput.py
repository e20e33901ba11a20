"""Iteration throughput of the ttt.data pipelines (examples/s, one process, CPU).

    python experiments/data_throughput.py [--seconds 3]

Each pipeline is timed for `--seconds` after its first batch (which pays for start-up: the
window-shuffle buffer, file listing). The tfds catalog image path runs on tfds.testing.mock_data
(random 32x32 images, no decoding), so it measures the crop/flip/RandAugment cost only (mixup is
done in the train step, not in the pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import ml_collections as mlc
import tensorflow_datasets as tfds

from ttt import data

PIPELINES = [
    ("text_corpus byte seq_len=128", dict(name="text_corpus", seq_len=128), 32),
    ("text_corpus byte seq_len=2048", dict(name="text_corpus", seq_len=2048), 8),
    ("mqar V=8192 N=256 K=64", dict(name="mqar", vocab_size=8192, seq_len=256, num_kv_pairs=64),
     64),
    ("digits 8x8", dict(name="digits"), 128),
    ("tfds_images cifar10 (mock) 32px crop+flip",
     dict(name="tfds_images", dataset="cifar10"), 128),
    ("tfds_images cifar10 (mock) 32px +randaug(2,15)",
     dict(name="tfds_images", dataset="cifar10", randaug=(2, 15)), 128),
]


def measure(cfg: dict, batch: int, seconds: float) -> tuple[float, float]:
    """-> (first-batch seconds, steady examples/s)."""
    mock = cfg["name"] == "tfds_images"
    ctx = (tfds.testing.mock_data(num_examples=2048, policy=tfds.testing.MockPolicy.USE_CODE)
           if mock else contextlib.nullcontext())
    with ctx:
        t0 = time.perf_counter()
        it = data.make_dataset(mlc.ConfigDict(cfg), "train", batch, seed=0).iterator()
        next(it)
        first = time.perf_counter() - t0
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            next(it)
            n += batch
        return first, n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(f"{'pipeline':55s} {'batch':>5s} {'first batch s':>13s} {'examples/s':>11s}")
    for label, cfg, batch in PIPELINES:
        first, rate = measure(cfg, batch, args.seconds)
        print(f"{label:55s} {batch:5d} {first:13.2f} {rate:11.0f}", flush=True)


if __name__ == "__main__":
    main()
