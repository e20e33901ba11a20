r"""Multi-query associative recall (MQAR), the Zoology-style sweep (Arora et al. 2023, §3).

Reproduces the Zoology figure "accuracy vs state size": for every mixer, a 2-layer model is trained
on MQAR at several (sequence length, key-value pairs) settings and model widths; accuracy on the
answer positions is plotted against the mixer's recurrent state size (floats per layer per
sequence). Attention solves MQAR at every setting (its KV cache grows with the sequence);
fixed-state mixers need a state that grows with the number of pairs. Zoology reports softmax
attention near 100% everywhere and linear-attention-like models falling off as pairs grow at
fixed width.

Argument: comma-separated tokens, any order (`experiments/args.py`; anything else is an error).
  <mixer>     ttt_linear (default), ttt_mlp, linear_attention, softmax, mamba2, gated_deltanet,
              ... (a causal mixer of the registry)
  n=<int>     sequence length (default 256; cpu 64)
  kv=<int>    key-value pairs (default 16; cpu 4)
  width=<int> model width (default 128; cpu 32); heads = width // 64 (at least 1; cpu 2)
  cpu         2-core CPU scale: 2 layers, vocab 256, 250 steps of 16 sequences (~1 min per run);
              too short for any mixer to solve MQAR: a quick look, not a measurement
  harness     the CPU harness (`make compare`): 2 layers, width 64 (2 heads), vocab 256, N = 64,
              8 pairs unless kv= says otherwise, 1,750 steps of 64 sequences at lr 3e-3 (5%
              warm-up, cosine), accuracy on 1,024 test sequences every 250 steps, and a short
              causal convolution (width 4) before every mixer (`model.pre_conv`, as in the
              Mamba backbone, H3 and Based). Without it, softmax attention's escape from the
              ~13% plateau (where it has learnt to answer with some value of the context, not
              the right one) depended on the seed: 0.997 / 0.143 / 0.974 at seeds 0 / 1 / 2,
              with 4 heads 0.797 / 0.970 / 0.176, with filler 0 0.867 / 0.798 / 0.966. With it,
              1.000 / 0.999 / 0.999 (> 0.96 by step 750 at every seed): the convolution hands
              each position its predecessor, the step of the induction circuit that attention
              had to find by itself. LaCT runs chunks (and a window) of 16 tokens here.
              ~3-10 minutes per run on one core (softmax fastest, TTT-MLP slowest).
  mix         train on a mixture of pair counts, 4, 8, 16, ... up to kv (example i holds the
              (i mod count)-th; `data.train_num_kv_pairs`), test on kv, with 100,000 distinct
              training sequences: Zoology's training mixture. The capacity frontier's setting
              (256 tokens, 64 pairs): without it softmax attention did not learn the lookup
              at the harness's budget (experiments/grid.py)
  smoke       a few steps, for tests

Single host:  python -m ttt.main --config experiments/mqar.py:ttt_linear,n=256,kv=16,width=128 \
                  --workdir runs/mqar/ttt_linear_256_16_128
Multi-host:   add --config.train.parallel=mesh and launch one process per host with --distributed.
The sweep: `SWEEP` lists (n, kv) and `WIDTHS` the widths; `sweep()` yields every argument string;
`python -m experiments.compare --configs ...` runs them and plots accuracy vs state size.
Runtime class: minutes per run on one accelerator at the default scale; ~1 minute per run on CPU.
"""

from __future__ import annotations

import functools

import ml_collections as mlc

from experiments.args import Grammar, mixer_names, positive_int, unset
from ttt import layers

MIXERS = ("ttt_linear", "ttt_mlp", "linear_attention", "softmax")
SWEEP = ((64, 4), (128, 8), (256, 16), (512, 64))  # (sequence length, key-value pairs)
WIDTHS = (64, 128, 256, 512)
CPU_SWEEP = ((64, 4), (64, 8), (128, 16))
HARNESS_STEPS = 1750
HARNESS_PAIRS = (4, 8, 16)
GRAMMAR = Grammar("mqar", default="ttt_linear",
                  names=functools.partial(mixer_names, causal_only=True),
                  name_label="causal mixers", flags=("cpu", "harness", "mix", "smoke"),
                  options={"n": positive_int, "kv": positive_int, "width": positive_int})


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Config for `python -m ttt.main --config experiments/mqar.py:<arg>`."""
    a = GRAMMAR.parse(arg)
    harness = a["harness"] and not a["smoke"]
    small = a["cpu"] or a["smoke"] or harness
    n = a["n"] or (64 if small else 256)
    kv = a["kv"] or (8 if harness else 4 if small else 16)
    width = a["width"] or (64 if harness else 32 if small else 128)
    heads = 2 if small else max(1, width // 64)
    mixer_kwargs = {}
    accepted = layers.accepted_kwargs(a["mixer"])
    if "stats" in accepted:
        mixer_kwargs["stats"] = False  # no diagnostic inner pass: MQAR reports accuracy only
    if "cache_size" in accepted:
        mixer_kwargs["cache_size"] = n  # the KV cache holds the whole sequence
    if small and "chunk" in accepted and "window" in accepted:  # LaCT: 4 updates in 64 tokens
        mixer_kwargs.update(chunk=16, window=16)  # (chunk 2048 would make it plain attention)
    c = mlc.ConfigDict()
    c.model = dict(kind="lm", preset="tiny", mixer=a["mixer"], mixer_kwargs=mixer_kwargs,
                   dtype="float32", scan_layers=True, remat="none", vocab_size=unset(int),
                   num_layers=2, width=width, num_heads=heads, ffn_dim=2 * width)
    c.data = dict(name="mqar", vocab_size=256 if small else 8192, seq_len=n, num_kv_pairs=kv,
                  num_train_examples=100_000 if not small else 20_000,
                  num_test_examples=3_000 if not small else 256, power_a=0.01)
    steps = 3 if a["smoke"] else (250 if a["cpu"] else 20_000)
    c.optim = dict(name="adamw", lr=3e-3 if small else 1e-3, end_lr=1e-5,
                   warmup_steps=1 if a["smoke"] else max(steps // 20, 1), b1=0.9, b2=0.95,
                   eps=1e-8, weight_decay=0.1, weight_decay_mask="all", clip=1.0,
                   ttt_mlp_lr_warmup=False, ttt_lr_mult_init=0.1)
    c.train = dict(
        steps=steps, global_batch_size=2 if a["smoke"] else (16 if small else 64), grad_accum=1,
        log_every=1 if a["smoke"] else 50, diag_every=1 if a["smoke"] else 50,
        eval_every=steps, eval_steps=1 if a["smoke"] else (8 if small else 47),
        checkpoint_every=steps, keep_checkpoints=1, keep_every=unset(int), async_checkpoints=False,
        seed=0, progress=True, parallel="single", mesh={"data": -1, "fsdp": 1, "model": 1},
        fsdp_min_size=2**14, partition_rules=(), label_smoothing=0.0, mixup_alpha=0.0)
    if harness:
        c.model.pre_conv = True  # a short causal conv before every mixer (module docstring)
        c.data.update(num_test_examples=1024)
        c.optim.update(warmup_steps=HARNESS_STEPS // 20)
        c.train.update(steps=HARNESS_STEPS, global_batch_size=64, log_every=50, diag_every=250,
                       eval_every=250, eval_steps=16, checkpoint_every=HARNESS_STEPS)
    if a["mix"]:
        counts = [p for p in (4 * 2**i for i in range(kv.bit_length())) if p < kv] + [kv]
        c.data.update(train_num_kv_pairs=",".join(map(str, counts)), num_train_examples=100_000)
    return mlc.ConfigDict(c)


def sweep(scale: str = "paper", mixers=MIXERS) -> list[str]:
    """Every argument string of the sweep: mixers x (n, kv) x widths ("paper"), the CPU grid, or
    the harness's pair counts."""
    if scale == "cpu":
        return [f"{m},n={n},kv={kv},cpu" for m in mixers for n, kv in CPU_SWEEP]
    if scale == "harness":
        return [f"{m},harness,kv={kv}" for m in mixers for kv in HARNESS_PAIRS]
    return [f"{m},n={n},kv={kv},width={w}" for m in mixers for n, kv in SWEEP for w in WIDTHS]
