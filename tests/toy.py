"""Small stand-ins for the model and data packages, used by the training tests (not part of the
package: `import toy` from a test, or `python tests/toy.py ...` for a subprocess run).

They follow the pinned interfaces exactly (`build_model(model_config)` returning a Linen module
whose `apply` gives `(logits, aux)`, and `make_dataset(...)` returning an object with `.meta` and
`.iterator()` whose iterator has `get_state()` / `set_state()`), so the trainer can be exercised in
seconds without the real TTT layers: what is tested here is the outer loop, not the mixer.

Batches are a pure function of (seed, step, row): every shard of every process sees the rows of the
same global batch, so single-process, multi-device and multi-process runs are comparable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

# ----------------------------------------------------------------------------------------------
# models


class ToyLM(nn.Module):
    """Embedding -> `layers` x (causal running-mean mixer + MLP) -> tied logits.

    `apply(variables, input_ids (B, N) int32, ttt_lr_mult=1.0) -> (logits (B, N, V), aux)`;
    aux["inner_loss"] is (layers, 2): a stand-in for the reconstruction loss before/after a step.
    """

    vocab_size: int
    width: int = 16
    layers: int = 2
    dtype: str = "float32"

    @nn.compact
    def __call__(self, input_ids, ttt_lr_mult=1.0, train=False):
        dtype = jnp.dtype(self.dtype)
        embed = nn.Embed(self.vocab_size, self.width, name="embed")
        h = embed(input_ids).astype(dtype)  # (B, N, C)
        n = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        inner = []
        for i in range(self.layers):
            u = nn.Dense(self.width, dtype=dtype, name=f"mix_{i}")(nn.RMSNorm(dtype=dtype)(h))
            z = jnp.cumsum(u, axis=1) / n  # (B, N, C) causal running mean
            before = jnp.mean(jnp.square(u - h))
            inner.append(jnp.stack([before, before * (1.0 - 0.5 * ttt_lr_mult)]))
            h = h + z * ttt_lr_mult
            h = h + nn.Dense(self.width, dtype=dtype, name=f"mlp_{i}")(jnp.tanh(h))
        h = nn.RMSNorm(dtype=dtype)(h)
        logits = embed.attend(h.astype(jnp.float32))  # (B, N, V)
        return logits, {"inner_loss": jnp.stack(inner).astype(jnp.float32)}


class ToyViT(nn.Module):
    """Patchify -> Dense -> mean-pool -> classifier; `apply(v, images, train=..., rngs=...)`.

    aux["inner_losses"] is (1, T=3) per-step losses (a stand-in for MTTT's diagnostics). With
    `train=True` and an "inner" rng it adds noise, so rng plumbing is exercised.
    """

    num_classes: int
    width: int = 16
    patch_size: int = 4
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images, train=False):
        p = self.patch_size
        b, h, w, c = images.shape
        x = images.reshape(b, h // p, p, w // p, p, c)  # (B, H/p, p, W/p, p, C)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)  # (B, L, ppC)
        x = nn.Dense(self.width, dtype=jnp.dtype(self.dtype))(x)
        if train and self.has_rng("inner"):
            x = x + 1e-3 * jax.random.normal(self.make_rng("inner"), x.shape, x.dtype)
        x = jnp.tanh(x).mean(axis=1)  # (B, width)
        logits = nn.Dense(self.num_classes)(x.astype(jnp.float32))
        steps = jnp.mean(jnp.square(x)) * jnp.array([1.0, 0.5, 0.25])
        return logits, {"inner_losses": steps[None, :]}


def build_model(model_config) -> nn.Module:
    """Stand-in for `ttt.models.build_model` (same config fields; width/layers are toy-sized)."""
    if model_config.kind == "lm":
        return ToyLM(vocab_size=model_config.vocab_size, dtype=model_config.get("dtype", "float32"))
    if model_config.kind == "vit":
        return ToyViT(num_classes=model_config.num_classes,
                      dtype=model_config.get("dtype", "float32"))
    raise ValueError(f"unknown model kind {model_config.kind!r}")


# ----------------------------------------------------------------------------------------------
# data


class _Iterator:
    """Deterministic batch iterator with grain-style `get_state` / `set_state`."""

    def __init__(self, make_batch, rows: slice, delay_s: float = 0.0):
        self._make_batch = make_batch
        self._rows = rows
        self._index = 0
        self._delay_s = delay_s  # a slow input pipeline, so tests can interrupt a run

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self._delay_s)
        batch = self._make_batch(self._index)
        self._index += 1
        return {k: v[self._rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"next_index": self._index}

    def set_state(self, state: dict) -> None:
        self._index = int(state["next_index"])


class ToyDataset:
    """Stand-in for `ttt.data.make_dataset(...)`'s return value."""

    def __init__(self, data_config, split, global_batch_size, *, seed, shard_index, shard_count):
        if global_batch_size % shard_count:
            raise ValueError(f"global batch {global_batch_size} not divisible by {shard_count}")
        self.config = data_config
        self.global_batch_size = global_batch_size
        self.seed = seed + (0 if split == "train" else 7919)
        per = global_batch_size // shard_count
        self.rows = slice(shard_index * per, (shard_index + 1) * per)
        if data_config.name == "toy_text":
            self.meta = {"vocab_size": data_config.vocab_size, "seq_len": data_config.seq_len}
        elif data_config.name == "toy_images":
            self.meta = {"num_classes": data_config.num_classes, "image_shape": (8, 8, 1)}
        else:
            raise FileNotFoundError(f"no toy dataset named {data_config.name!r}")

    def _batch(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        b = self.global_batch_size
        if self.config.name == "toy_text":
            v, n = self.config.vocab_size, self.config.seq_len
            start = rng.integers(0, v, size=(b, 1))
            step = rng.integers(1, 3, size=(b, 1))
            seq = (start + step * np.arange(n + 1)[None, :]) % v  # (B, N+1) learnable pattern
            mask = np.ones((b, n), np.float32)
            for i in range(b):  # rows differ in how many tokens count: a per-device mean would
                mask[i, : (i % 4) * n // 8] = 0.0  # weight them wrongly
            if index >= self.config.get("nan_from", 1 << 30):
                mask[:] = np.nan  # simulates a diverged run from batch `nan_from` on
            return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                    "mask": mask}
        labels = rng.integers(0, self.config.num_classes, size=(b,))
        images = rng.normal(size=(b, 8, 8, 1)).astype(np.float32)
        images[:, 0, 0, 0] += labels  # (B, H, W, C): the label is readable from one pixel
        return {"images": images, "labels": labels.astype(np.int32)}

    def iterator(self) -> _Iterator:
        return _Iterator(self._batch, self.rows, self.config.get("delay_s", 0.0))


def make_dataset(data_config, split, global_batch_size, *, seed, shard_index=0, shard_count=1):
    """Stand-in for `ttt.data.make_dataset` (names "toy_text" and "toy_images")."""
    return ToyDataset(data_config, split, global_batch_size, seed=seed,
                      shard_index=shard_index, shard_count=shard_count)


# ----------------------------------------------------------------------------------------------
# configs and a command line for subprocess tests


def toy_config(kind: str = "lm", **train) -> mlc.ConfigDict:
    """A complete config for the stand-ins (3 steps, batch 8); `train` overrides config.train."""
    c = mlc.ConfigDict()
    c.model = dict(kind=kind, preset="tiny", mixer="ttt_linear", mixer_kwargs={}, dtype="float32",
                   vocab_size=None, num_classes=None, image_size=None, channels=None)
    if kind == "lm":
        c.data = dict(name="toy_text", vocab_size=32, seq_len=16)
    else:
        c.data = dict(name="toy_images", num_classes=4)
    c.optim = dict(name="adamw", lr=1e-2, end_lr=1e-3, warmup_steps=1, b1=0.9, b2=0.95,
                   weight_decay=0.1, clip=1.0, ttt_mlp_lr_warmup=False, weight_decay_mask="all")
    c.train = dict(steps=3, global_batch_size=8, log_every=1, eval_every=0, eval_steps=1,
                   checkpoint_every=100, keep_checkpoints=3, seed=0, parallel="single",
                   mesh={"data": -1, "fsdp": 1, "model": 1}, grad_accum=1, progress=False,
                   fsdp_min_size=0, label_smoothing=0.0, mixup_alpha=0.0)
    c = mlc.ConfigDict(c)
    c.train.update(train)
    return c


def real_config(mixer: str, *, x64: bool = False, **train) -> mlc.ConfigDict:
    """`toy_config` for the real model (`ttt.models.build_model`, tiny preset) with registry
    mixer `mixer` on the toy data; x64: float64 compute (parameters and inner loop), so runs that
    differ only in summation order agree far below float32 rounding."""
    config = toy_config("lm", **train)
    config.model.mixer = mixer
    if x64:
        config.model.dtype = "float64"
    return config


def main(argv=None) -> int:
    """`python tests/toy.py --workdir D [--train '{json}'] [--data '{json}'] [--mixer NAME
    [--model '{json}']] [--num_processes P --process_id I --coordinator H:P]`: train the toy LM,
    or with --mixer the real LM (tiny preset) on the toy data; prints one JSON line
    {"step", "preempted", "process"}; exit 143 if preempted."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--kind", default="lm")
    parser.add_argument("--train", default="{}")
    parser.add_argument("--data", default="{}")
    parser.add_argument("--mixer", default=None, help="a registry mixer: the real model")
    parser.add_argument("--model", default="{}", help="config.model updates (with --mixer)")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--coordinator", default=None)
    args = parser.parse_args(argv)
    if args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from ttt.train.train import train_and_evaluate

    if args.mixer:
        from ttt.models import build_model as real_build_model

        config, builder = real_config(args.mixer, **json.loads(args.train)), real_build_model
        config.model.update(json.loads(args.model))
    else:
        config, builder = toy_config(args.kind, **json.loads(args.train)), build_model
    config.data.update(json.loads(args.data))
    summary = train_and_evaluate(config, args.workdir, build_model=builder,
                                 make_dataset=make_dataset)
    print(json.dumps({"step": summary["step"], "preempted": summary["preempted"],
                      "process": jax.process_index()}), flush=True)
    return 143 if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main())
