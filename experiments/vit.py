r"""Image classification with a ViT whose token mixer is MTTT (or a baseline) — arXiv 2310.13807.

Reproduces the MTTT paper's ImageNet tables (docs/design.md §10.3): from 16x16 patches with ViT-S
(196 tokens) — self-attention 76.5, MTTT-MLP 74.6, linear attention 73.0-73.2, MTTT-Linear 72.8
top-1 — and from raw pixels with ViT-Ti (50,176 tokens) — MTTT-MLP 61.9 (T = 1) / 65.2 (SGD, T = 4),
linear attention 49.9-55.7, self-attention out of memory. On the embedded digits the default and
`cpu` arguments show the same mechanics in seconds.

Argument: comma-separated tokens, any order (`experiments/args.py`; anything else is an error).
  <mixer>    a name in the mixer registry (default mttt_mlp): mttt_linear, mttt_mlp,
             linear_attention_noncausal, softmax_noncausal, ...; a causal name with a
             non-causal twin (softmax, linear_attention) builds the twin
  <preset>   model size from ttt.models.PRESETS["vit"] (default tiny): tiny, Ti, S
  T=<n>      MTTT inner steps (default 1; 0 = answer with W0)
  gd | sgd   MTTT inner steps on all tokens (default) or on T random chunks
  norm=<n>   linear-attention normaliser: adaptive (default) or constant
  smoke      shrink everything so a run takes seconds on a CPU (4 steps, batch 8)
  cpu        2-core CPU scale on digits: 300 steps of 64 images (~30 s after compilation)
  imagenet   the official recipe from 16x16 patches (ViT-S/16 unless a preset is given)
  pixels     the official recipe from raw pixels (ViT-Ti/pixels unless a preset is given)

The official recipe (`imagenet` / `pixels`): batch 1024, 90 epochs, Adam (0.9, 0.999) at 1e-3,
10k warm-up steps then cosine, clip 1.0, weight decay 1e-4 on kernels only; patches add
RandAugment(2, 15) and mixup 0.2, pixels use flips and crops only. ImageNet comes from a prepared
tfds `imagenet2012` in `data.data_dir`.

Single host:  python -m ttt.main --config experiments/vit.py:mttt_mlp,smoke --workdir /tmp/vit
ImageNet:     python -m ttt.main --config experiments/vit.py:mttt_mlp,T=4,sgd,pixels \
                  --workdir runs/mttt_pixels --config.data.data_dir=/data/tfds
Multi-host:   the same command on every host with --distributed (mesh placement).
Runtime class: smoke seconds, cpu under a minute; ImageNet patches ~a day on 8 accelerators,
pixels several days.
"""

from __future__ import annotations

import functools

import ml_collections as mlc

from experiments.args import Grammar, mixer_names, non_negative_int, one_of, unset
from ttt import layers

PRESETS = ("tiny", "Ti", "S")
IMAGENET_TRAIN = 1_281_167
GRAMMAR = Grammar("vit", default="mttt_mlp",
                  names=functools.partial(mixer_names, causal_only=False),
                  flags=("smoke", "cpu", "imagenet", "pixels"), presets=PRESETS,
                  choices={"mode": ("gd", "sgd")},
                  options={"T": non_negative_int, "norm": one_of("adaptive", "constant")})


def _mixer_kwargs(a: dict) -> dict:
    kwargs = {}
    if "steps" in layers.accepted_kwargs(a["mixer"]):  # MTTT: inner steps and their data
        if a["T"] is not None:
            kwargs["steps"] = a["T"]
        if a["mode"] is not None:
            kwargs["mode"] = a["mode"]
    elif a["T"] is not None or a["mode"] is not None:
        raise ValueError(f"vit config: T= / gd / sgd apply to MTTT mixers, not {a['mixer']!r}")
    if a["norm"] is not None:
        kwargs["normalize"] = a["norm"]
    return kwargs


def _imagenet(c: mlc.ConfigDict, a: dict) -> None:
    """The official ImageNet recipe in place (docs/design.md §10.3)."""
    pixels = a["pixels"]
    batch = 1024
    steps = 90 * IMAGENET_TRAIN // batch
    c.model.update(preset=a["preset"] or ("Ti" if pixels else "S"), patch_size=0 if pixels else 16,
                   num_classes=1000, image_size=224, channels=3, dtype="bfloat16",
                   remat="block" if pixels else "none")
    c.data = dict(name="tfds_images", dataset="imagenet2012", data_dir=unset(str), image_size=224,
                  pixels=pixels, flip=True, randaug=unset(tuple) if pixels else (2, 15),
                  mixup=0.0)
    c.optim.update(lr=1e-3, end_lr=0.0, warmup_steps=10_000, b2=0.999, weight_decay=1e-4,
                   weight_decay_mask="matrices")
    c.train.update(steps=steps, global_batch_size=batch, log_every=100, diag_every=1000,
                   eval_every=5000, eval_steps=49, checkpoint_every=5000, parallel="mesh",
                   mixup_alpha=0.0 if pixels else 0.2)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Config for `python -m ttt.main --config experiments/vit.py:<arg>`."""
    a = GRAMMAR.parse(arg)
    smoke = a["smoke"]
    c = mlc.ConfigDict()
    c.model = dict(
        kind="vit", preset=a["preset"] or "tiny", mixer=a["mixer"], mixer_kwargs=_mixer_kwargs(a),
        dtype="float32", scan_layers=True, remat="none", patch_size=2,
        # filled from the dataset (typed placeholders: --config.model.x=... can set them)
        num_classes=unset(int), image_size=unset(int), channels=unset(int),
        # None: the preset's
        num_layers=unset(int), width=unset(int), num_heads=unset(int), mlp_dim=unset(int))
    c.data = dict(name="digits")
    c.optim = dict(
        name="adamw", lr=1e-3, end_lr=1e-5, warmup_steps=1 if smoke else 100, b1=0.9, b2=0.95,
        eps=1e-8, weight_decay=0.1, weight_decay_mask="matrices", clip=1.0,
        ttt_mlp_lr_warmup=False)
    c.train = dict(
        steps=4 if smoke else 1500, global_batch_size=8 if smoke else 64, grad_accum=1,
        log_every=1 if smoke else 20, diag_every=1 if smoke else 100,
        eval_every=4 if smoke else 300, eval_steps=1 if smoke else 5,
        checkpoint_every=2 if smoke else 500, keep_checkpoints=3, keep_every=unset(int),
        async_checkpoints=True, seed=0, progress=True,
        parallel="single", mesh={"data": -1, "fsdp": 1, "model": 1}, fsdp_min_size=2**14,
        partition_rules=(), label_smoothing=0.0, mixup_alpha=0.0)
    if a["imagenet"] or a["pixels"]:
        _imagenet(c, a)
    elif a["cpu"] and not smoke:
        steps = 300
        c.optim.warmup_steps = 40
        c.train.update(steps=steps, log_every=20, diag_every=20, eval_every=steps,
                       eval_steps=5, checkpoint_every=steps, keep_checkpoints=1,
                       async_checkpoints=False)
    return mlc.ConfigDict(c)


def sweep(scale: str = "paper") -> list[str]:
    """Argument strings of the paper's tables ("paper") or the CPU accuracy-vs-T sweep ("cpu")."""
    if scale == "cpu":
        return [f"mttt_mlp,T={t},cpu" for t in (0, 1, 2, 4)]
    out = []
    for mode in ("imagenet", "pixels"):
        out += [f"mttt_linear,{mode}", "mttt_mlp,T=1," + mode]
        out += [f"mttt_mlp,T={t},{g},{mode}" for t in (2, 4) for g in ("gd", "sgd")]
        out += [f"linear_attention_noncausal,norm={n},{mode}" for n in ("adaptive", "constant")]
        out += [f"softmax_noncausal,{mode}"]
    return out
