r"""The TTT-LM ablation ladder (TTT-LM paper, arXiv 2407.04620, Table 1): from linear attention to
TTT-Linear one ingredient at a time, 125M parameters, Pile, context 2k.

| rung | name              | change                                                | paper ppl |
|------|-------------------|-------------------------------------------------------|-----------|
| 1    | linear_attn       | linear attention with elu+1 feature map and normaliser | 15.91     |
| 2    | linear_attn_plain | the simplest linear attention: no feature map/normaliser | 15.23   |
| 3    | ttt_equivalence   | TTT-Linear with W0 = 0, batch GD, η = 1, no LN/residual  | 15.23     |
|      |                   | (Theorem 1: the same function as rung 2)              |           |
| 4    | learnable_W0      | + learnable W0 (and bias)                             | 15.27     |
| 5    | ln_residual       | + f(x) = x + LN(f_res(x)), post-norm, η = 1/d           | 14.05     |
| 6    | mini_batch        | + mini-batch TTT, b = 16 (with RoPE at t mod b)       | 12.35     |
| 7    | learnable_eta     | + learnable η (token offsets and per-head gate)       | 11.99     |
| 8    | mamba_backbone    | + Mamba backbone (convolutions, output gate)          | 11.09     |

Choices the paper leaves open, fixed here: the constant η of rungs 3–4 is 1 (so rung 3 is exactly
rung 2: same parameters, same function), and from rung 5 on it is the ttt-lm-jax scale base_lr / d
(with an LN inside f, η = 1 makes the first updates blow up); RoPE (positions t mod b) enters with
mini-batches, where it first means something.

Argument: comma-separated tokens, any order (`experiments/args.py`; anything else is an error).
  <rung>    a rung name or number 1..8 (default 8)
  cpu       2-core CPU scale: tiny LM (2 layers, width 64), 128-byte contexts of the embedded
            corpus, 150 steps of 8 sequences (~30 s per rung after compilation)
  smoke     a few steps, for tests
At paper scale the data is the Pile through tfds (`data.dataset`, `data.data_dir`) with the Llama-2
SentencePiece model in `data.tokenizer`; set them to what you have.

Single host:  python -m ttt.main --config experiments/ablation.py:mini_batch --workdir runs/abl/6
Multi-host:   the same command on every host with --distributed (mesh placement, FSDP).
The sweep: `sweep(scale)` lists the eight argument strings; `python -m experiments.compare
--preset demo --only ladder` runs the CPU ladder and tables validation loss per rung.
Runtime class: 125M x 2.5B tokens per rung is ~a day on 8 accelerators; the CPU ladder is ~5
minutes.
"""

from __future__ import annotations

import ml_collections as mlc

from experiments import lm
from experiments.args import Grammar

PAPER_PPL = {"linear_attn": 15.91, "linear_attn_plain": 15.23, "ttt_equivalence": 15.23,
             "learnable_W0": 15.27, "ln_residual": 14.05, "mini_batch": 12.35,
             "learnable_eta": 11.99, "mamba_backbone": 11.09}
RUNGS = tuple(PAPER_PPL)
GRAMMAR = Grammar("ablation", names=RUNGS, default=RUNGS[-1], name_key="rung", name_label="rungs",
                  aliases={str(i + 1): r for i, r in enumerate(RUNGS)}, flags=("cpu", "smoke"))

_TTT_BASE = dict(learn_W0=False, ln_residual=False, post_norm=False, mini_batch=0, learn_eta=False,
                 eta=1.0, rope=False, stats=False)


def rung_model(rung: str, head_dim: int) -> tuple[str, dict]:
    """(mixer name, mixer_kwargs) of a rung; each rung adds one ingredient to the previous one."""
    if rung == "linear_attn":
        return "linear_attention", {"feature_map": "elu", "normalize": "adaptive"}
    if rung == "linear_attn_plain":
        return "linear_attention", {}
    steps = [
        ("ttt_equivalence", {}),
        ("learnable_W0", {"learn_W0": True}),
        ("ln_residual", {"ln_residual": True, "post_norm": True, "eta": 1.0 / head_dim}),
        ("mini_batch", {"mini_batch": 16, "rope": True}),
        ("learnable_eta", {"learn_eta": True, "eta": None}),
        ("mamba_backbone", {}),
    ]
    kwargs = dict(_TTT_BASE)
    for name, change in steps:
        kwargs.update(change)
        if name == rung:
            break
    else:
        raise ValueError(f"unknown ablation rung {rung!r}; rungs: {', '.join(RUNGS)}")
    if rung == "mamba_backbone":
        return "ttt_linear_mamba", {"stats": False}  # every ingredient on, Mamba backbone
    if rung == "learnable_eta":
        return "ttt_linear", {"stats": False}  # == the registry's TTT-Linear defaults
    return "ttt_linear", kwargs


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Config for `python -m ttt.main --config experiments/ablation.py:<arg>`."""
    a = GRAMMAR.parse(arg)
    rung, flags = a["rung"], [f for f in GRAMMAR.flags if a[f]]
    small = bool(flags)
    base = lm.get_config(",".join(["ttt_linear", "tiny" if small else "125m", *flags]
                                  + ([] if small else ["ctx=2k", "paper"])))
    width = base.model.width or 64
    heads = base.model.num_heads or 4
    if not small:
        width, heads = 768, 12
    mixer, kwargs = rung_model(rung, width // heads)
    if kwargs.get("mini_batch") == 0:
        # one mini-batch spanning the sequence (batch GD); spelt out because ttt.config.validate
        # accepts only positive mini-batch sizes
        kwargs["mini_batch"] = int(base.data.seq_len)
    with base.unlocked():
        if "cpu" in flags and "smoke" not in flags:
            base.train.update(steps=150, eval_every=150, checkpoint_every=150)
        base.model.mixer = mixer
        base.model.mixer_kwargs = kwargs
        base.optim.ttt_mlp_lr_warmup = False
        base.rung = rung
        base.paper_perplexity = PAPER_PPL[rung]
    return base


def sweep(scale: str = "paper", numbered: bool = False) -> list[str]:
    """The eight rungs' argument strings ("paper" or "cpu" scale)."""
    suffix = "" if scale == "paper" else f",{scale}"
    return [f"{i + 1 if numbered else r}{suffix}" for i, r in enumerate(RUNGS)]
