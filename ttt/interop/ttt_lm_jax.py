"""ttt-lm-jax `CausalLM` parameter trees <-> `ttt.models.CausalLM` (docs/design.md §11).

- `import_ttt_lm_jax(tree, **overrides) -> (model, variables)`: a ttt-lm-jax `CausalLM` tree
  (TTT-Linear / TTT-MLP on either backbone, or the self-attention baseline) becomes a
  `ttt.models.CausalLM` whose `apply(variables, input_ids)` gives the official logits.
- `export_ttt_lm_jax(model_or_config, variables) -> tree`: the inverse.
- `ttt_lm_jax_config(tree, **overrides)`: the `model_config` the import builds.
- `load_ttt_lm_jax_checkpoint(path) -> tree`: the parameters of an official checkpoint file.

ttt-lm-jax layout (C width, H heads, d = C/H, b mini-batch, F SwiGLU hidden, V vocab, w conv
width; every Dense is `x @ kernel` with kernel (in, out); "k/n" is one dict key holding a '/'):

| official path (under `params/model/`)            | shape       | ours (under `params/`)    |
|--------------------------------------------------|-------------|---------------------------|
| wte/embedding                                    | (V, C)      | wte/embedding (tied head) |
| ln_f/kernel, h/i/{seq_norm,ffn_norm}/kernel      | (C,)        | same (RMSNorm gain)       |
| h/i/feed_forward/{w1,w3}/kernel; w2/kernel       | (C,F); (F,C)| same                      |
| h/i/conv/conv1/kernel, bias (pre-conv, optional) | (w,1,C),(C,)| same                      |
| h/i/conv/conv_norm/kernel                        | (C,)        | same                      |
| h/i/seq_modeling_block/                          |             | h/i/seq_modeling_block/   |
|   wq, wk (transformer), wv, wo, wg (mamba) /kernel | (C, C)    | same                      |
|   conv_q, conv_k /kernel, /bias (mamba)          | (w,1,C),(C,)| same                      |
|   "learnable_ttt_lr/kernel", "…/bias"            | (H,C,1),(H,1)| learnable_ttt_lr/{kernel,bias} |
|   learnable_token_idx                            | (b,)        | same                      |
|   "ttt_norm/scale", "ttt_norm/bias"              | (H, d)      | ttt_norm/{scale,bias}     |
|   post_norm/scale, post_norm/bias                | (C,)        | same                      |
|   ttt_dense_0 (linear; mlp)                      | (H,d,d); (H,d,4d) | same                |
|   ttt_bias_0  (linear; mlp)                      | (H,1,d); (H,1,4d) | (H, d); (H, 4d)     |
|   ttt_dense_1, ttt_bias_1 (mlp)                  | (H,4d,d), (H,1,d) | same, (H, d)        |

The table describes the layout; the mapping itself is defined once in code, for both directions:
a path is the same on both sides except where `_OFFICIAL_ROOT` (the `model/` level),
`_LITERAL_GROUPS` (the quoted single keys) and `_RESHAPES` (the ttt_bias_l shapes) below say
otherwise; `import_ttt_lm_jax` and `export_ttt_lm_jax` both read them.

Conventions the mapping relies on (checked against the official source): heads split head-major
from C; η[i, j] = ttt_base_lr · max(1/(i+1) + learnable_token_idx[i], 0) · sigmoid(x_j ·
kernel_h + bias_h) / d with x the pre-normed layer input; RoPE at position t mod b; the transformer
backbone (`ttt_linear_base` / `ttt_mlp_base`) has wk and no gate, the Mamba one (`ttt_linear` /
`ttt_mlp`) has conv_q/conv_k on x wq and the gate gelu_tanh(x wg); `ttt_base_lr` is not stored in
the tree (an override: default 1.0 linear, 0.1 MLP). Self-attention layers (wq, wk, wv, wo only)
become the "softmax" mixer (RoPE at absolute positions); their head count is not in the tree
(override `num_heads`, else the paper preset of that width). An untied `lm_head` cannot be
represented (our embeddings are tied) and is refused.

Export writes the official nesting: dicts nested at every '/' except the quoted multi-head keys
above, which the official modules create as single keys containing '/'; `nested=True` splits
those too. Import reads either form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import msgpack
import numpy as np
from flax import serialization, traverse_util

from ttt import layers
from ttt.interop.trees import (
    build_lm,
    check_like,
    flatten,
    lm_model,
    lm_target,
    nest,
    param_dtype,
    require,
    strip_params,
)
from ttt.models import PRESETS, stack_layers, unstack_layers

__all__ = ["export_ttt_lm_jax", "import_ttt_lm_jax", "load_ttt_lm_jax_checkpoint",
           "ttt_lm_jax_config"]

_LM_OVERRIDES = (
    "ttt_base_lr", "num_heads", "rope_theta", "rms_norm_eps", "dtype", "scan_layers", "remat",
    "mixer_kwargs",
)
_TTT_MIXERS = ("ttt_linear", "ttt_mlp", "ttt_linear_mamba", "ttt_mlp_mamba")
# TTTMixer attributes whose value must be the official one for an export to mean the same thing.
_OFFICIAL_TTT = dict(learn_eta=True, learn_W0=True, ln_residual=True, rope=True, post_norm=True,
                     mlp_factor=4)


# ---------------------------------------------------------------------------- the mapping

# Official params/model/<path> is ours params/<path>, leaf for leaf, except as below.
_OFFICIAL_ROOT = "model/"
# Official multi-head parameters: one key containing '/' inside seq_modeling_block.
_LITERAL_GROUPS = ("learnable_ttt_lr", "ttt_norm")


class _Reshape(NamedTuple):
    """Leaves (`matches` the path under model/) stored with another shape than ours."""
    matches: Callable[[str], bool]
    official: str  # the official shape, for messages
    fits: Callable[[Any], bool]  # an official leaf has that shape
    to_ours: Callable[[Any], Any]
    to_official: Callable[[Any], Any]


_RESHAPES = (
    _Reshape(  # the inner biases ttt_bias_l: official (H, 1, n), ours (H, n)
        matches=lambda p: p.startswith("h/") and p.rsplit("/", 1)[-1].startswith("ttt_bias_"),
        official="(H, 1, n)", fits=lambda a: a.ndim == 3 and a.shape[1] == 1,
        to_ours=lambda a: a[:, 0, :], to_official=lambda a: a[:, None, :]),
)


def _to_ours(path: str, leaf):
    for r in _RESHAPES:
        if r.matches(path):
            if not r.fits(leaf):
                raise ValueError(f"model/{path}: expected shape {r.official}, got {leaf.shape}")
            return r.to_ours(leaf)
    return leaf


def _to_official(path: str, leaf):
    for r in _RESHAPES:
        if r.matches(path):
            return r.to_official(leaf)
    return leaf


def _official_model_flat(tree: Mapping) -> dict[str, Any]:
    """Official tree -> {path under model/: array}, refusing what our CausalLM cannot hold."""
    if not isinstance(tree, Mapping):
        raise ValueError(f"tree: expected a nested dict of arrays, got {type(tree).__name__}")
    flat = strip_params(flatten(tree))
    if any(k.startswith("lm_head/") for k in flat):
        raise ValueError("tree has an untied lm_head: ttt.models.CausalLM ties the output head to "
                         "wte/embedding, so only tie_word_embeddings=True checkpoints import")
    outside = sorted(k for k in flat if not k.startswith(_OFFICIAL_ROOT))
    if outside:
        raise ValueError(f"tree: expected every parameter under 'model/' (a ttt-lm-jax CausalLM "
                         f"tree), found {outside[:5]}")
    return {k[len(_OFFICIAL_ROOT):]: v for k, v in flat.items()}



def _layer_keys(flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    """{"h/<i>/rest": leaf} -> per-layer dicts [{rest: leaf}, ...] in layer order."""
    per: dict[int, dict[str, Any]] = {}
    for k, v in flat.items():
        if k.startswith("h/"):
            _, i, rest = k.split("/", 2)
            per.setdefault(int(i), {})[rest] = v
    if not per or sorted(per) != list(range(len(per))):
        raise ValueError(f"tree: expected blocks model/h/0 .. model/h/<L-1>, got {sorted(per)}")
    return [per[i] for i in range(len(per))]


def _preset_name(dims: dict) -> str:
    """The paper preset with these dimensions, else "tiny" (every dimension is overridden)."""
    for name, p in PRESETS["lm"].items():
        if all(p[k] == dims[k] for k in ("num_layers", "width", "num_heads", "ffn_dim")):
            return name
    return "tiny"


def ttt_lm_jax_config(tree: Mapping, **overrides) -> ml_collections.ConfigDict:
    """The `model_config` (see `ttt.models.build_model`) of an official ttt-lm-jax tree.

    Architecture from names and shapes: backbone (wk → transformer, conv_q → Mamba), learner
    (ttt_dense_1 → MLP), layers, width, heads (from ttt_norm/scale (H, d)), SwiGLU hidden,
    vocabulary, mini-batch size b (learnable_token_idx (b,)), pre-conv (conv/conv1 present).
    Overrides: ttt_base_lr (default 1.0 linear, 0.1 MLP), num_heads (self-attention trees only),
    rope_theta, dtype ("float32"), scan_layers (True), remat ("none"), mixer_kwargs (extra mixer
    attributes, e.g. {"stats": False}). rms_norm_eps and non-default conv widths are carried in
    the config's `norm_eps` / `conv_width` fields, which `import_ttt_lm_jax` applies.
    """
    unknown = sorted(set(overrides) - set(_LM_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; accepted: {', '.join(_LM_OVERRIDES)}")
    flat = _official_model_flat(tree)
    V, C = np.shape(require(flat, "wte/embedding", "tree"))
    blocks = _layer_keys(flat)
    blk = blocks[0]
    seq = {k[len("seq_modeling_block/"):]: v for k, v in blk.items()
           if k.startswith("seq_modeling_block/")}
    mixer_kwargs: dict[str, Any] = {}
    if "ttt_dense_0" in seq:
        learner = "mlp" if "ttt_dense_1" in seq else "linear"
        backbone = "mamba" if "conv_q/kernel" in seq else "transformer"
        H, d = np.shape(require(seq, "ttt_norm/scale", "seq_modeling_block"))
        if "num_heads" in overrides and overrides["num_heads"] != H:
            raise ValueError(f"num_heads={overrides['num_heads']} contradicts ttt_norm/scale of "
                             f"shape {(H, d)} ({H} heads)")
        b = np.shape(require(seq, "learnable_token_idx", "seq_modeling_block"))[0]
        mixer = f"ttt_{learner}"
        mixer_kwargs.update(backbone=backbone, mini_batch=int(b),
                            base_lr=float(overrides.get("ttt_base_lr",
                                                        1.0 if learner == "linear" else 0.1)))
        if learner == "mlp":
            mixer_kwargs["mlp_factor"] = int(np.shape(seq["ttt_dense_0"])[-1] // d)
        if backbone == "mamba":
            mixer_kwargs["conv_width"] = int(np.shape(seq["conv_q/kernel"])[0])
    elif {"wq/kernel", "wk/kernel", "wv/kernel", "wo/kernel"} == set(seq):
        mixer = "softmax"
        H = overrides.get("num_heads")
        if H is None:
            match = [p["num_heads"] for p in PRESETS["lm"].values() if p["width"] == C]
            if not match:
                raise ValueError(f"self-attention tree of width {C}: its head count is not "
                                 f"stored in the tree; pass num_heads=")
            H = match[0]
        if "ttt_base_lr" in overrides:
            raise ValueError("ttt_base_lr: this tree has self-attention layers, no TTT layers")
    else:
        raise ValueError(f"model/h/0/seq_modeling_block: neither a TTT layer (ttt_dense_0) nor "
                         f"self-attention (wq, wk, wv, wo): keys {sorted(seq)}")
    if "rope_theta" in overrides:
        mixer_kwargs["rope_theta"] = float(overrides["rope_theta"])
    mixer_kwargs.update(dict(overrides.get("mixer_kwargs") or {}))
    F = np.shape(require(blk, "feed_forward/w1/kernel", "model/h/0"))[1]
    dims = dict(num_layers=len(blocks), width=int(C), num_heads=int(H), ffn_dim=int(F))
    pre_conv = "conv/conv1/kernel" in blk
    return ml_collections.ConfigDict(dict(
        kind="lm", preset=_preset_name(dims), mixer=mixer, mixer_kwargs=mixer_kwargs,
        vocab_size=int(V), pre_conv=pre_conv, dtype=overrides.get("dtype", "float32"),
        scan_layers=bool(overrides.get("scan_layers", True)),
        remat=overrides.get("remat", "none"),
        conv_width=int(np.shape(blk["conv/conv1/kernel"])[0]) if pre_conv else 4,
        norm_eps=float(overrides.get("rms_norm_eps", 1e-6)), **dims))



def _check_layers_alike(flat: Mapping[str, Any]) -> None:
    """ValueError naming the first path where a block's parameters differ from block 0's."""
    blocks = _layer_keys(flat)
    ref = {k: np.shape(v) for k, v in blocks[0].items()}
    for i, blk in enumerate(blocks[1:], start=1):
        got = {k: np.shape(v) for k, v in blk.items()}
        for k in sorted(set(ref) | set(got)):
            if ref.get(k) != got.get(k):
                raise ValueError(f"model/h/{i}/{k}: shape {got.get(k)} but model/h/0/{k} has "
                                 f"{ref.get(k)}; every block must have the same layout")


def import_ttt_lm_jax(tree: Mapping, **overrides) -> tuple[nn.Module, dict]:
    """Official ttt-lm-jax CausalLM tree -> (model, variables) with identical logits.

    tree: nested dict (with or without the outer "params" key; multi-head keys either as single
    '/'-containing keys, as the official modules store them, or nested). Overrides: see
    `ttt_lm_jax_config`. Returns a `ttt.models.CausalLM` and {"params": ...} cast to its parameter
    dtype (float32; float64 with dtype="float64"); `model.apply(variables, input_ids (B, N))`
    -> (logits (B, N, V), aux). The official model needs N = its max length, a multiple of b; ours
    takes any N (a final partial mini-batch is answered like the first tokens of a full one).
    """
    config = ttt_lm_jax_config(tree, **overrides)
    model = build_lm(config)
    dtype = param_dtype(config.dtype)
    flat = _official_model_flat(tree)
    _check_layers_alike(flat)
    ours = {}
    for path, leaf in flat.items():
        ours[path] = _to_ours(path, jnp.asarray(leaf, dtype))
    params = nest(ours)
    if config.scan_layers:
        params = stack_layers(params)
    check_like(params, lm_target(model), "import_ttt_lm_jax")
    return model, {"params": params}


def load_ttt_lm_jax_checkpoint(path: str) -> dict:
    """A ttt-lm-jax checkpoint file -> its parameter tree `{"params": {"model": ...}}`, ready for
    `import_ttt_lm_jax`.

    The file is what the official `StreamingCheckpointer` writes: a stream of msgpack pairs
    (key path, flax-serialised array), one per leaf of the flattened state. Both of its kinds read:
    `streaming_train_state*` (parameters under params/params/model/, the optimizer state beside
    them, which is skipped without decoding) and `streaming_params*` (model/... at the top).
    bfloat16 leaves (its default `float_dtype`) come back as bfloat16; the import casts them.
    """
    params: dict[tuple, Any] = {}
    try:
        with open(path, "rb") as f:
            for key, value in msgpack.Unpacker(f, read_size=2**26, max_buffer_size=0):
                key = tuple(key)
                if key[:3] == ("params", "params", "model"):
                    key = key[2:]
                elif key[:1] != ("model",):
                    continue  # step, optimizer state
                params[key] = serialization.msgpack_restore(value)
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as err:
        raise ValueError(f"{path} is not a ttt-lm-jax streaming checkpoint ({err})") from None
    if not params:
        raise ValueError(f"{path} holds no model parameters (no params/params/model/... or "
                         "model/... keys): not a ttt-lm-jax checkpoint")
    return {"params": traverse_util.unflatten_dict(params)}


def _check_exportable(model) -> None:
    if model.pattern:
        raise ValueError(f"export_ttt_lm_jax: a hybrid stack (pattern {model.mixer}) has no "
                         "ttt-lm-jax counterpart: the official model has one mixer in every layer")
    if model.mixer == "softmax":
        kw = dict(model.mixer_kwargs)
        bad = {k: v for k, v in kw.items() if k in ("causal", "rope", "use_bias")
               and v != {"causal": True, "rope": True, "use_bias": False}[k]}
    elif model.mixer in _TTT_MIXERS:
        mixer = layers.make_mixer(model.mixer, model.width, model.num_heads,
                                  **dict(model.mixer_kwargs))
        bad = {k: getattr(mixer, k) for k, v in _OFFICIAL_TTT.items() if getattr(mixer, k) != v}
        if mixer.mini_batch == 0:
            bad["mini_batch"] = 0
        if mixer.inner_bias is False:
            bad["inner_bias"] = False
    else:
        raise ValueError(f"export_ttt_lm_jax: mixer {model.mixer!r} has no ttt-lm-jax "
                         f"counterpart; exportable: softmax, {', '.join(_TTT_MIXERS)}")
    if bad:
        raise ValueError(f"export_ttt_lm_jax: {model.mixer} with {bad} differs from the official "
                         f"layer (which has {_OFFICIAL_TTT}, a positive mini-batch and biases)")


def export_ttt_lm_jax(model_or_config, variables: Mapping, *, params_key: bool = True,
                      nested: bool = False) -> dict:
    """(model or model_config, variables) -> the official ttt-lm-jax CausalLM tree.

    Inverse of `import_ttt_lm_jax`: `{"params": {"model": {...}}}` (without the outer key when
    params_key=False), ttt_bias_l reshaped (H, n) -> (H, 1, n), multi-head groups written as the
    official single '/'-containing keys unless nested=True. Scanned or unrolled layouts both work.
    Leaves keep their dtype. ValueError for mixers or ablation settings the official code lacks.
    """
    model = lm_model(model_or_config)
    _check_exportable(model)
    params = variables.get("params", variables)
    flat = flatten(unstack_layers(dict(params)))
    out = {}
    for path, leaf in flat.items():
        out[f"{_OFFICIAL_ROOT}{path}"] = _to_official(path, leaf)

    def literal(parts):
        return not nested and len(parts) >= 3 and parts[-3] == "seq_modeling_block" and \
            parts[-2] in _LITERAL_GROUPS

    tree = nest(out, literal)
    return {"params": tree} if params_key else tree

