r"""Language modelling with a TTT (or baseline) sequence mixer — TTT-LM (arXiv 2407.04620).

Reproduces the TTT-LM paper's language-modelling comparisons: TTT-Linear and TTT-MLP (transformer
and Mamba backbones) against a Transformer (softmax attention) and linear attention, at the paper's
sizes 125M / 350M / 760M / 1.3B and contexts 2k / 8k on the Pile, and up to 32k on Books3, with the
paper's recipe (`paper`). The paper reports its results as perplexity-vs-FLOPs plots (Figures
11-13): at 2k TTT-Linear, TTT-MLP, Mamba and the Transformer are close; at 8k both TTT
variants beat Mamba and, with the Mamba backbone, match or beat the Transformer; on Books at
32k the TTT curves keep improving with context while Mamba's stops.

Argument: comma-separated tokens, any order (`experiments/args.py`; anything else is an error).
  <mixer>    a causal mixer of the registry (default ttt_linear): ttt_linear, ttt_mlp,
             ttt_linear_mamba, ttt_mlp_mamba, linear_attention, softmax, lact, mamba2,
             gated_deltanet, ... (any causal entry of the registry)
  <preset>   model size from ttt.models.PRESETS["lm"] (default tiny): tiny, 125m, 350m, 760m, 1.3b
  smoke      shrink everything so a run takes seconds on a CPU (4 steps, batch 8, 64 tokens)
  cpu        2-core CPU scale on the embedded corpus: tiny model, 128-byte contexts, 200 steps of
             8 sequences (under a minute per mixer after compilation)
  long       long context at 2-core CPU scale (`make compare`): the tiny model on 2k-byte
             windows of the embedded corpus (or any --config.data.name=text_files corpus), 400
             steps of 2 sequences, validation on the whole split; `python -m ttt.evaluate`
             then gives the loss by token position (experiments.compare does it for you)
  ctx=<n>    context length in tokens (accepts 2k / 8k / 32k); default 512 (smoke 64, cpu 128,
             long 2k, paper 2k)
  paper      the paper recipe (docs/design.md §10.3): Llama-2 SentencePiece tokenizer (32000),
             0.5M tokens per step, Chinchilla token budget (125m 2.5B, 350m 7B, 760m 15B,
             1.3b 26B tokens), AdamW(0.9, 0.95), wd 0.1, clip 1.0, 10% warm-up then cosine to
             1e-5, bfloat16 compute, rematerialised blocks, FSDP over a device mesh
  books      with `paper`: Books3 instead of the Pile (the long-context runs; ctx up to 32k)
  repeats    the long-context probe's data (`ttt.data.repeats`): half of every window's
             tokens are 32-token spans copied from 16 .. seq_len tokens earlier in the window;
             `python -m experiments.long_context` then gives the loss on copies by distance
  opt=<name> the inner optimizer of a TTT or LaCT mixer: sgd | momentum | muon | adam
             (`ttt.ops.inner_opt`; default: plain mini-batch GD for TTT, muon for LaCT)

LaCT (`lact`) keeps LaCT's proportions at every size: 4 fast-weight heads with a SwiGLU hidden
width equal to their head dim beside the preset's attention heads, and one fast-weight update per
chunk of min(2048, ctx / 4) tokens with a sliding window of the same length (2048 from ctx 8k on;
512 at 2k; 32 at the cpu scale's 128).

Mamba2 (`mamba2`) and Gated DeltaNet (`gated_deltanet`) keep their papers' layer configuration
(Mamba2: d_state 128, head dim 64, expand 2; Gated DeltaNet: value heads of twice the key head
dim), which holds more parameters than attention's four C x C maps (about 6 C^2 and 8 C^2); at
the sizes 125m ... 1.3b the SwiGLU next to them narrows so the model has the Transformer's
parameter count (`ttt.models.param_match`; FFN 2048 -> 1440 / 1008 at 125m, 5504 -> 4032 / 2752
at 1.3b). An explicit --config.model.ffn_dim wins.

Titans (`titans`) runs its memory as the exact token recurrence (mini_batch 1) in every LM: at
the long scale's 2k tokens its chunks of 16 diverged at every seed (chunks of 4 at two of
three), the token recurrence trained at every seed (docs/results.md, "Titans in the 2k LM").
It costs ~3.5 times the chunked layer's step on a CPU; --config.model.mixer_kwargs.mini_batch=16
brings the chunks back.

Data: the embedded standard-library text corpus with the byte tokenizer (no download); `paper`
reads a prepared tfds dataset (`data.dataset`, `data.data_dir`) and `data.tokenizer` must point
at the Llama-2 `tokenizer.model`.
Optimizer: the paper recipe — AdamW(0.9, 0.95), wd 0.1, clip 1.0, linear warm-up then cosine
to 1e-5; TTT-MLP mixers also warm their inner base lr 0.01 -> 0.1 over the warm-up.

Single host:  python -m ttt.main --config experiments/lm.py:ttt_linear,smoke --workdir /tmp/lm
Paper size:   python -m ttt.main --config experiments/lm.py:ttt_mlp_mamba,125m,ctx=8k,paper \
                  --workdir gs://.../ttt_mlp_125m_8k
Multi-host:   the same command on every host plus --distributed (or --num_processes,
              --process_id, --coordinator_address); the global batch is split over the mesh.
Compile only: add --compile_only --simulate_devices=8 [--workdir=DIR] for the sharding report
              (per-device memory, collectives, XLA warnings) of the paper's fsdp=8 mesh.
Runtime class: smoke seconds, cpu ~1-2 minutes; paper 125m@2k ~ hours on a v4-64 / 8xH100,
1.3b@8k ~ days.
"""

from __future__ import annotations

import functools

import ml_collections as mlc

from experiments.args import Grammar, mixer_names, one_of, tokens, unset
from ttt import layers
from ttt.models import param_match
from ttt.models.presets import PRESETS as SIZES
from ttt.ops.inner_opt import OPTIMIZERS

PRESETS = ("tiny", "125m", "350m", "760m", "1.3b")
PEAK_LR = {"tiny": 3e-3, "125m": 3e-3, "350m": 1.5e-3, "760m": 1.25e-3, "1.3b": 1e-3}
PAPER_TOKENS = {"tiny": 2**24, "125m": 2.5e9, "350m": 7e9, "760m": 15e9, "1.3b": 26e9}
TOKENS_PER_STEP = 2**19  # 0.5M tokens per optimizer step (paper §3 / ttt-lm-jax scripts)
MIXERS = ("ttt_linear", "ttt_mlp", "ttt_linear_mamba", "ttt_mlp_mamba", "linear_attention",
          "softmax", "lact")
# mixers wider than attention: at the paper sizes their FFN narrows to the Transformer's count
PARAM_MATCHED = ("mamba2", "gated_deltanet")
TITANS_LM_CHUNK = 1  # Titans' memory chunk in the LMs: the token recurrence (module docstring)
CONTEXTS = {"pile": (2048, 8192), "books": (2048, 8192, 32768)}
LONG_STEPS = 400
REPEATS = {"fraction": 0.5, "span": 32, "min_distance": 16}  # the `repeats` token's copies
GRAMMAR = Grammar("lm", default="ttt_linear",
                  names=functools.partial(mixer_names, causal_only=True),
                  name_label="causal mixers",
                  flags=("smoke", "cpu", "long", "paper", "books", "repeats"),
                  presets=PRESETS, preset_default="tiny",
                  options={"ctx": tokens, "opt": one_of(*OPTIMIZERS)})


def ttt_mlp_recipe(mixer: str) -> bool:
    """Whether the paper's TTT-MLP inner-lr warm-up applies: a TTT layer with an MLP learner."""
    spec = layers.MIXERS[mixer]
    return spec.module is layers.TTTMixer and spec.attrs()["learner"] == "mlp"


def _paper(c: mlc.ConfigDict, a: dict) -> None:
    """The paper recipe in place (docs/design.md §10.3)."""
    n = a["ctx"] or 2048
    steps = max(int(PAPER_TOKENS[a["preset"]] // TOKENS_PER_STEP), 10)
    c.model.update(vocab_size=32000, dtype="bfloat16", remat="block")
    c.data = dict(name="tfds_text", dataset="books3" if a["books"] else "pile",
                  data_dir=unset(str),
                  tokenizer="tokenizer.model", seq_len=n)
    c.optim.update(warmup_steps=steps // 10)
    c.train.update(steps=steps, global_batch_size=max(TOKENS_PER_STEP // n, 1), log_every=50,
                   diag_every=500, eval_every=1000, eval_steps=20, checkpoint_every=1000,
                   parallel="mesh", mesh={"data": -1, "fsdp": 8, "model": 1})


def _cpu(c: mlc.ConfigDict, a: dict) -> None:
    """2-core CPU scale: a tiny LM on 128-byte windows of the embedded corpus."""
    steps = 200
    c.data.seq_len = a["ctx"] or 128
    c.optim.update(warmup_steps=20)
    c.train.update(steps=steps, global_batch_size=8, log_every=25, diag_every=25,
                   eval_every=steps, eval_steps=16, checkpoint_every=steps, keep_checkpoints=1,
                   async_checkpoints=False)
    if "stats" in layers.accepted_kwargs(a["mixer"]):
        c.model.mixer_kwargs = {"stats": False}  # skip the diagnostic inner pass (compile time)


def _long(c: mlc.ConfigDict, a: dict) -> None:
    """Long context at 2-core CPU scale: the tiny LM on 2k windows, 400 steps of 2 sequences.

    Softmax attention dominates the cost (its N x N scores at 2k: ~1.7 s of one core per step,
    TTT-Linear ~0.2 s), so the batch is small and the run long rather than the other way round."""
    steps = LONG_STEPS
    c.data.seq_len = a["ctx"] or 2048
    c.optim.update(warmup_steps=steps // 10)
    c.train.update(steps=steps, global_batch_size=2, log_every=20, diag_every=100,
                   eval_every=steps, eval_steps=32, checkpoint_every=steps, keep_checkpoints=1,
                   async_checkpoints=False)
    if "stats" in layers.accepted_kwargs(a["mixer"]):
        c.model.mixer_kwargs = {"stats": False}


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    """Config for `python -m ttt.main --config experiments/lm.py:<arg>`."""
    a = GRAMMAR.parse(arg)
    smoke = a["smoke"]
    c = mlc.ConfigDict()
    c.model = dict(
        kind="lm", preset=a["preset"], mixer=a["mixer"], mixer_kwargs={},
        dtype="float32",  # compute dtype; "bfloat16" keeps parameters and inner state float32
        scan_layers=True,  # nn.scan over identical blocks: compile time independent of depth
        remat="none",  # "block" etc.: rematerialise blocks in the backward pass
        vocab_size=unset(int),  # filled from the dataset
        # None: the preset's (typed placeholders, so --config.model.width=... can set them)
        num_layers=unset(int), width=unset(int), num_heads=unset(int), ffn_dim=unset(int),
    )
    c.data = dict(name="text_corpus", tokenizer="byte", seq_len=a["ctx"] or (64 if smoke else 512))
    c.optim = dict(
        name="adamw", lr=PEAK_LR[a["preset"]], end_lr=1e-5, warmup_steps=1 if smoke else 200,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, weight_decay_mask="all", clip=1.0,
        ttt_mlp_lr_warmup=ttt_mlp_recipe(a["mixer"]), ttt_lr_mult_init=0.1)
    c.train = dict(
        steps=4 if smoke else 2000, global_batch_size=8 if smoke else 32, grad_accum=1,
        log_every=1 if smoke else 20, diag_every=1 if smoke else 100,
        eval_every=4 if smoke else 500, eval_steps=1 if smoke else 10,
        checkpoint_every=2 if smoke else 500, keep_checkpoints=3, keep_every=unset(int),
        async_checkpoints=True, seed=0, progress=True,
        parallel="single", mesh={"data": -1, "fsdp": 1, "model": 1}, fsdp_min_size=2**14,
        partition_rules=(), label_smoothing=0.0, mixup_alpha=0.0)
    if a["paper"]:
        _paper(c, a)
    elif a["long"] and not smoke:
        _long(c, a)
    elif a["cpu"] and not smoke:
        _cpu(c, a)
    if a["repeats"]:
        c.data.update(repeats=REPEATS["fraction"], repeat_span=REPEATS["span"],
                      repeat_min_distance=REPEATS["min_distance"],
                      repeat_max_distance=int(c.data.seq_len))
    if "cache_size" in layers.accepted_kwargs(a["mixer"]):  # the KV cache holds a whole context
        c.model.mixer_kwargs = {"cache_size": max(int(c.data.seq_len), 2048)}
    if layers.MIXERS[a["mixer"]].module is layers.LaCTMixer:  # LaCT's chunk : context proportion
        chunk = min(2048, max(int(c.data.seq_len) // 4, 1))
        c.model.mixer_kwargs = {"chunk": chunk, "window": chunk}
    if a["mixer"] == "titans":  # the token recurrence (module docstring)
        c.model.mixer_kwargs = {**c.model.mixer_kwargs, "mini_batch": TITANS_LM_CHUNK}
    if a["mixer"] in PARAM_MATCHED and a["preset"] != "tiny":
        size = SIZES["lm"][a["preset"]]
        c.model.ffn_dim = param_match.matched_ffn_dim(
            a["mixer"], size["width"], size["num_heads"], size["ffn_dim"],
            mixer_kwargs=c.model.mixer_kwargs.to_dict())
    if a["opt"]:
        if "inner_opt" not in layers.accepted_kwargs(a["mixer"]):
            raise ValueError(f"lm config: opt={a['opt']}: mixer {a['mixer']!r} has no inner "
                             "optimizer; use a TTT mixer or lact")
        c.model.mixer_kwargs = {**c.model.mixer_kwargs, "inner_opt": a["opt"]}
    return mlc.ConfigDict(c)


def sweep(scale: str = "paper") -> list[str]:
    """Argument strings of the paper grid (mixers x sizes x Pile contexts, plus Books 32k), or
    the four CPU-scale mixers."""
    if scale == "cpu":
        return [f"{m},cpu" for m in ("ttt_linear", "ttt_mlp", "linear_attention", "softmax")]
    grid = [f"{m},{p},ctx={n // 1024}k,paper" for m in MIXERS for p in PRESETS[1:]
            for n in CONTEXTS["pile"]]
    return grid + [f"{m},{p},ctx=32k,paper,books" for m in MIXERS for p in PRESETS[1:]]
