"""Import and export of the official TTT parameter trees (docs/design.md §11).

- `import_ttt_lm_jax(tree, **overrides) -> (model, variables)`: a ttt-lm-jax `CausalLM` tree
  (TTT-Linear / TTT-MLP on either backbone, or the self-attention baseline) becomes a
  `ttt.models.CausalLM` whose `apply(variables, input_ids)` gives the official logits.
- `export_ttt_lm_jax(model_or_config, variables) -> tree`: the inverse.
- `import_mttt_layer(tree, **config) -> (layer, variables)` / `export_mttt_layer(...)`: the same
  for one official mttt `TTTLayer` (config may be the official `config.inner.TTT` dict as it is).
- `load_ttt_lm_jax_checkpoint(path) -> tree`: the parameters of an official checkpoint file.
- `init_ttt_from_transformer(ttt_config, transformer_variables)`: a TTT LM whose embeddings, norms,
  feed-forwards and Q/K/V/O projections come from a softmax-attention LM of the same size.

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

Conventions the mapping relies on (checked against the official source): heads split head-major
from C; η[i, j] = ttt_base_lr · max(1/(i+1) + learnable_token_idx[i], 0) · sigmoid(x_j ·
kernel_h + bias_h) / d with x the pre-normed layer input; RoPE at position t mod b; the transformer
backbone (`ttt_linear_base` / `ttt_mlp_base`) has wk and no gate, the Mamba one (`ttt_linear` /
`ttt_mlp`) has conv_q/conv_k on x wq and the gate gelu_tanh(x wg); `ttt_base_lr` is not stored in
the tree (an override: default 1.0 linear, 0.1 MLP). Self-attention layers (wq, wk, wv, wo only)
become the "softmax" mixer (RoPE at absolute positions); their head count is not in the tree
(override `num_heads`, else the paper preset of that width). An untied `lm_head` cannot be
represented (our embeddings are tied) and is refused.

mttt `TTTLayer` layout (dh = C/H; all keys at the top level of the layer's dict):
"psi/kernel", "phi/kernel" (H, C, dh); "psi/bias", "phi/bias" (H, dh); "g/kernel", "h/kernel"
(H, dh, C); g_bias, h_bias (1, C); "inner_Dense_0/kernel" (H, dh, dh) (mlp_1) or (H, dh, 4dh)
(mlp_2) and "inner_Dense_1/kernel" (H, 4dh, dh) (mlp_2), each with an optional "/bias" (H, out);
optional "decoder_LN/scale", "decoder_LN/bias" (H, C). Ours nests the same names. The inner-loop
settings (inner_itr, inner_lr, SGD) are config, not parameters.

Export writes the official nesting: dicts nested at every '/' except the quoted multi-head keys
above, which the official modules create as single keys containing '/'; `nested=True` splits
those too. Import reads either form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from ttt import layers
from ttt.models import PRESETS, build_model, stack_layers, unstack_layers

__all__ = [
    "export_mttt_layer",
    "export_ttt_lm_jax",
    "import_mttt_layer",
    "import_ttt_lm_jax",
    "init_ttt_from_transformer",
    "load_ttt_lm_jax_checkpoint",
    "ttt_lm_jax_config",
]

_LM_OVERRIDES = (
    "ttt_base_lr", "num_heads", "rope_theta", "rms_norm_eps", "dtype", "scan_layers", "remat",
    "mixer_kwargs",
)
# Official ttt-lm-jax multi-head parameters: one key containing '/' inside seq_modeling_block.
_LM_LITERAL_GROUPS = ("learnable_ttt_lr", "ttt_norm")
_MTTT_LITERAL_GROUPS = ("psi", "phi", "g", "h", "inner_Dense_0", "inner_Dense_1", "decoder_LN")
_MTTT_ALIASES = {"inner_itr": "steps", "inner_lr": "lrs", "SGD": "mode"}
# Keys of the official `config.inner.TTT` dict that describe the tree (checked against it) or only
# its initialisation (ignored on import); inner_itr, inner_lr and SGD are aliases above.
_MTTT_OFFICIAL = ("inner_encoder", "inner_encoder_init", "inner_encoder_bias", "decoder_LN",
                  "train_init", "num_heads", "width")
_TTT_MIXERS = ("ttt_linear", "ttt_mlp", "ttt_linear_mamba", "ttt_mlp_mamba")
# TTTMixer attributes whose value must be the official one for an export to mean the same thing.
_OFFICIAL_TTT = dict(learn_eta=True, learn_W0=True, ln_residual=True, rope=True, post_norm=True,
                     mlp_factor=4)


# ---------------------------------------------------------------------------- tree helpers

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; keys that already contain '/' flatten the same way."""
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {f"{prefix}{k}": v for k, v in flat.items()}


def _nest(flat: Mapping[str, Any], literal: Callable[[list[str]], bool] = lambda p: False) -> dict:
    """{"a/b/c": leaf} -> nested dicts; `literal(parts)` True keeps the last two parts one key."""
    out: dict = {}
    for path, leaf in flat.items():
        parts = path.split("/")
        if len(parts) >= 2 and literal(parts):
            parts = [*parts[:-2], f"{parts[-2]}/{parts[-1]}"]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def _strip_params(flat: dict[str, Any]) -> dict[str, Any]:
    if flat and all(k.startswith("params/") for k in flat):
        return {k[len("params/"):]: v for k, v in flat.items()}
    return flat


def _check_like(params: Mapping, target: Mapping, what: str) -> None:
    """ValueError unless `params` has exactly the paths and shapes of `target` (eval_shape tree)."""
    got = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
    want = {k: tuple(v.shape) for k, v in _flatten(target).items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]}, expected {want[k]}"
                 for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if problems:
        raise ValueError(f"{what}: the parameter tree does not fit the model: "
                         + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else ""))


def _param_dtype(dtype_name: str):
    return jnp.float64 if dtype_name == "float64" else jnp.float32


def _require(flat: Mapping, key: str, what: str):
    if key not in flat:
        raise ValueError(f"{what}: no parameter {key!r} (keys: {', '.join(sorted(flat)[:20])})")
    return flat[key]


# ---------------------------------------------------------------------------- ttt-lm-jax LM

def _official_model_flat(tree: Mapping) -> dict[str, Any]:
    """Official tree -> {path under model/: array}, refusing what our CausalLM cannot hold."""
    if not isinstance(tree, Mapping):
        raise ValueError(f"tree: expected a nested dict of arrays, got {type(tree).__name__}")
    flat = _strip_params(_flatten(tree))
    if any(k.startswith("lm_head/") for k in flat):
        raise ValueError("tree has an untied lm_head: ttt.models.CausalLM ties the output head to "
                         "wte/embedding, so only tie_word_embeddings=True checkpoints import")
    outside = sorted(k for k in flat if not k.startswith("model/"))
    if outside:
        raise ValueError(f"tree: expected every parameter under 'model/' (a ttt-lm-jax CausalLM "
                         f"tree), found {outside[:5]}")
    return {k[len("model/"):]: v for k, v in flat.items()}


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
    V, C = np.shape(_require(flat, "wte/embedding", "tree"))
    blocks = _layer_keys(flat)
    blk = blocks[0]
    seq = {k[len("seq_modeling_block/"):]: v for k, v in blk.items()
           if k.startswith("seq_modeling_block/")}
    mixer_kwargs: dict[str, Any] = {}
    if "ttt_dense_0" in seq:
        learner = "mlp" if "ttt_dense_1" in seq else "linear"
        backbone = "mamba" if "conv_q/kernel" in seq else "transformer"
        H, d = np.shape(_require(seq, "ttt_norm/scale", "seq_modeling_block"))
        if "num_heads" in overrides and overrides["num_heads"] != H:
            raise ValueError(f"num_heads={overrides['num_heads']} contradicts ttt_norm/scale of "
                             f"shape {(H, d)} ({H} heads)")
        b = np.shape(_require(seq, "learnable_token_idx", "seq_modeling_block"))[0]
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
    F = np.shape(_require(blk, "feed_forward/w1/kernel", "model/h/0"))[1]
    dims = dict(num_layers=len(blocks), width=int(C), num_heads=int(H), ffn_dim=int(F))
    pre_conv = "conv/conv1/kernel" in blk
    return ml_collections.ConfigDict(dict(
        kind="lm", preset=_preset_name(dims), mixer=mixer, mixer_kwargs=mixer_kwargs,
        vocab_size=int(V), pre_conv=pre_conv, dtype=overrides.get("dtype", "float32"),
        scan_layers=bool(overrides.get("scan_layers", True)),
        remat=overrides.get("remat", "none"),
        conv_width=int(np.shape(blk["conv/conv1/kernel"])[0]) if pre_conv else 4,
        norm_eps=float(overrides.get("rms_norm_eps", 1e-6)), **dims))


def _build_lm(config) -> nn.Module:
    """build_model plus the two fields it does not read (pre-conv width, RMSNorm eps)."""
    model = build_model(config)
    extra = {k: config[k] for k in ("conv_width", "norm_eps")
             if k in config and config[k] != getattr(model, k)}
    return model.clone(**extra) if extra else model


def _lm_target(model) -> dict:
    """Parameter shapes of `model` (traced, not allocated; TTT diagnostics off: no params)."""
    kw = dict(model.mixer_kwargs)
    if "stats" in layers.accepted_kwargs(model.mixer):
        model = model.clone(mixer_kwargs=tuple(sorted({**kw, "stats": False}.items())))
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]


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
    model = _build_lm(config)
    dtype = _param_dtype(config.dtype)
    flat = _official_model_flat(tree)
    _check_layers_alike(flat)
    ours = {}
    for path, leaf in flat.items():
        leaf = jnp.asarray(leaf, dtype)
        if path.startswith("h/") and path.rsplit("/", 1)[-1].startswith("ttt_bias_"):
            if leaf.ndim != 3 or leaf.shape[1] != 1:
                raise ValueError(f"model/{path}: expected shape (H, 1, n), got {leaf.shape}")
            leaf = leaf[:, 0, :]  # (H, 1, n) -> (H, n)
        ours[path] = leaf
    params = _nest(ours)
    if config.scan_layers:
        params = stack_layers(params)
    _check_like(params, _lm_target(model), "import_ttt_lm_jax")
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
    import msgpack
    from flax import serialization

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


def _lm_model(model_or_config) -> nn.Module:
    return model_or_config if isinstance(model_or_config, nn.Module) else _build_lm(
        model_or_config)


def _check_exportable(model) -> None:
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
    model = _lm_model(model_or_config)
    _check_exportable(model)
    params = variables.get("params", variables)
    flat = _flatten(unstack_layers(dict(params)))
    out = {}
    for path, leaf in flat.items():
        if path.startswith("h/") and path.rsplit("/", 1)[-1].startswith("ttt_bias_"):
            leaf = leaf[:, None, :]  # (H, n) -> (H, 1, n)
        out[f"model/{path}"] = leaf

    def literal(parts):
        return not nested and len(parts) >= 3 and parts[-3] == "seq_modeling_block" and \
            parts[-2] in _LM_LITERAL_GROUPS

    tree = _nest(out, literal)
    return {"params": tree} if params_key else tree


# ---------------------------------------------------------------------------- mttt layer

def _check_official_mttt(official: dict, flat: Mapping, H: int, C: int, learner: str) -> None:
    """ValueError naming the first key of the official `config.inner.TTT` dict (or num_heads /
    width) that contradicts the tree."""
    psi = f"psi/kernel (H, C, dh) = {tuple(np.shape(flat['psi/kernel']))}"
    if "num_heads" in official and official["num_heads"] != H:
        raise ValueError(f"num_heads={official['num_heads']!r} contradicts the tree: {psi} holds "
                         f"{H} heads")
    if "width" in official and official["width"] != C:
        raise ValueError(f"width={official['width']!r} contradicts the tree: {psi} has width {C}")
    if "inner_encoder" in official:
        encoder = official["inner_encoder"]
        if encoder not in ("mlp_1", "mlp_2"):
            raise ValueError(f"inner_encoder={encoder!r}: the official encoders are 'mlp_1' "
                             "(linear) and 'mlp_2' (MLP)")
        has = "mlp_2 (it has inner_Dense_1)" if learner == "mlp" else "mlp_1 (no inner_Dense_1)"
        if (encoder == "mlp_2") != (learner == "mlp"):
            raise ValueError(f"inner_encoder={encoder!r} contradicts the tree: its encoder is "
                             f"{has}")
    for key, path in (("inner_encoder_bias", "inner_Dense_0/bias"),
                      ("decoder_LN", "decoder_LN/scale")):
        if key in official and bool(official[key]) != (path in flat):
            raise ValueError(f"{key}={official[key]!r} contradicts the tree: it "
                             f"{'has' if path in flat else 'has no'} {path}")


def import_mttt_layer(tree: Mapping, **config) -> tuple[nn.Module, dict]:
    """Official mttt `TTTLayer` parameter dict -> (layer, variables) with identical outputs.

    tree: the layer's dict (keys like "psi/kernel", nested or not, optional outer "params").
    Inferred: heads H and width C (psi/kernel (H, C, dh)), learner ("mlp" when inner_Dense_1 is
    present = official mlp_2), inner biases, MLP factor, decoder LN. config: MTTTMixer attributes
    (steps, lrs, mode, dtype, ...) or the official `config.inner.TTT` dict as it is
    (`import_mttt_layer(tree, **config.inner.TTT)`): inner_itr, inner_lr (a tuple; its first
    `steps` entries are used), SGD (bool); inner_encoder, inner_encoder_bias and decoder_LN must
    agree with the tree, as must num_heads / width when given (a contradiction is a ValueError
    naming the key); inner_encoder_init only initialises and is ignored; train_init=False (W0
    frozen) imports as a frozen zero W0 when the tree's linear W0 is zero, else as parameters (the
    same function; to keep them frozen, leave them out of your optimizer). Defaults as the
    official patch config: steps=1, lrs=(1.0,)·steps, mode="gd". learn_W0=False is accepted only
    when inner_Dense_* are all zero.
    Returns an `MTTTMixer` and {"params": ...}: `layer.apply(variables, x (B, N, C))` -> (y, aux).
    SGD mode draws its permutations from our own "inner" RNG stream, so it matches the official
    layer in distribution, not sample by sample.
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"tree: expected a dict of arrays, got {type(tree).__name__}")
    flat = _strip_params(_flatten(tree))
    H, C, dh = np.shape(_require(flat, "psi/kernel", "mttt TTTLayer"))
    learner = "mlp" if "inner_Dense_1/kernel" in flat else "linear"
    official = {k: config[k] for k in _MTTT_OFFICIAL if k in config}
    _check_official_mttt(official, flat, int(H), int(C), learner)
    cfg = {_MTTT_ALIASES.get(k, k): v for k, v in config.items() if k not in _MTTT_OFFICIAL}
    if "mode" in cfg and isinstance(cfg["mode"], bool):
        cfg["mode"] = "sgd" if cfg["mode"] else "gd"
    steps = int(cfg.setdefault("steps", 1))
    if cfg.get("lrs") is not None:
        cfg["lrs"] = tuple(float(x) for x in tuple(cfg["lrs"])[:steps])
    attrs = dict(inner_bias="inner_Dense_0/bias" in flat, decoder_ln="decoder_LN/scale" in flat)
    if learner == "mlp":
        attrs["mlp_factor"] = int(np.shape(flat["inner_Dense_0/kernel"])[-1] // dh)
    dtype_name = cfg.pop("dtype", "float32")
    pdt = _param_dtype(dtype_name)
    inner = [k for k in flat if k.startswith("inner_Dense_")]
    zero_w0 = bool(inner) and all(not np.any(np.asarray(flat[k])) for k in inner)
    frozen_zero = official.get("train_init", True) is False and learner == "linear" and zero_w0
    learn_W0 = cfg.pop("learn_W0", bool(inner) and not frozen_zero)
    if not learn_W0 and inner:
        if not zero_w0:
            raise ValueError("learn_W0=False fixes W0 = 0, but the tree's inner_Dense_* are not "
                             "all zero; drop learn_W0=False to import them")
        flat = {k: v for k, v in flat.items() if k not in inner}
    layer = layers.make_mixer(f"mttt_{learner}", int(C), int(H), learn_W0=learn_W0,
                              dtype=jnp.dtype(dtype_name), param_dtype=pdt, **attrs, **cfg)
    params = _nest({k: jnp.asarray(v, pdt) for k, v in flat.items()})
    x = jnp.zeros((1, 2, int(C)), pdt)
    target = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    _check_like(params, target, "import_mttt_layer")
    return layer, {"params": params}


def export_mttt_layer(layer: nn.Module, variables: Mapping, *, params_key: bool = False,
                      nested: bool = False) -> dict:
    """(MTTTMixer, variables) -> the official mttt `TTTLayer` parameter dict.

    Inverse of `import_mttt_layer`. A layer with a frozen zero W0 (learn_W0 False, our default
    for "linear") exports zero inner_Dense_* arrays, as the official layer always has them.
    Multi-head groups are single '/'-containing keys unless nested=True; wrapped in {"params": }
    when params_key=True.
    """
    if not isinstance(layer, layers.MTTTMixer):
        raise ValueError(f"export_mttt_layer: expected an MTTTMixer, got {type(layer).__name__}")
    flat = _flatten(dict(variables.get("params", variables)))
    if not any(k.startswith("inner_Dense_") for k in flat):
        learner = layer.make_learner()
        dh = layer.width // layer.num_heads
        leaf = next(iter(flat.values()))
        shapes = jax.eval_shape(lambda key: learner.init(key, dh), jax.random.PRNGKey(0))
        for l, (w_name, b_name) in enumerate(learner.dense):
            for suffix, name in (("kernel", w_name), ("bias", b_name)):
                if name is not None:
                    flat[f"inner_Dense_{l}/{suffix}"] = jnp.zeros(
                        (layer.num_heads, *shapes[name].shape), leaf.dtype)

    def literal(parts):
        return not nested and len(parts) == 2 and parts[0] in _MTTT_LITERAL_GROUPS

    tree = _nest(flat, literal)
    return {"params": tree} if params_key else tree


# ---------------------------------------------------------------------------- transformer -> TTT

_SHARED_MIXER_PARAMS = ("wq", "wk", "wv", "wo")


def init_ttt_from_transformer(ttt_config, transformer_variables: Mapping, *,
                              seed: int = 0) -> tuple[nn.Module, dict]:
    """A TTT LM started from a trained softmax-attention LM of the same dimensions.

    TTT-LM §2 motivates it: softmax attention is the kernel-regression limit of TTT (Theorem 2),
    and both read the same q, k, v projections. `ttt_config` (a model_config or a built
    CausalLM) names the TTT variant; its parameters are initialised with `seed`, then every path
    outside the mixers (embeddings, RMSNorms, SwiGLU feed-forwards, a pre-conv if both have one)
    and the mixers' wq/wk/wv/wo kernels are overwritten by the transformer's. TTT-only parameters
    (W0, ttt_norm, η gate and offsets, post_norm, wg, conv_q/conv_k) keep their initial values;
    transformer parameters without a TTT counterpart (wk under the Mamba backbone, biases) are
    dropped. Scanned or unrolled layouts on either side. Returns (model, {"params": ...}).
    """
    model = _lm_model(ttt_config)
    ids = jnp.zeros((1, 1), jnp.int32)
    theirs = unstack_layers(dict(transformer_variables.get("params", transformer_variables)))
    if model.scan_layers:
        theirs = stack_layers(theirs)  # both sides in the TTT model's layout
    theirs = _flatten(theirs)
    target = _flatten(_lm_target(model))
    shared, problems = [], []
    for path, leaf in target.items():
        parts = path.split("/")
        if "seq_modeling_block" in parts:
            if parts[parts.index("seq_modeling_block") + 1] not in _SHARED_MIXER_PARAMS:
                continue  # TTT-only: keeps its initial value
        if path not in theirs:
            if not (parts[0] == "h" and "conv" in parts[1:3]):
                problems.append(f"missing {path}")  # only a pre-conv may be TTT-only
        elif np.shape(theirs[path]) != leaf.shape:
            problems.append(f"{path}: {np.shape(theirs[path])} vs {leaf.shape}")
        else:
            shared.append(path)
    if problems:
        raise ValueError("init_ttt_from_transformer: the transformer is not the same size as the "
                         "TTT model: " + "; ".join(problems[:10]))
    params = _flatten(jax.jit(model.init)(jax.random.PRNGKey(seed), ids)["params"])
    for path in shared:
        params[path] = jnp.asarray(theirs[path], params[path].dtype)
    new = _nest(params)
    return model, {"params": new}
