"""One official mttt `TTTLayer` <-> our `MTTTMixer` (docs/design.md §11).

- `import_mttt_layer(tree, **config) -> (layer, variables)`: the layer's parameter dict (config may
  be the official `config.inner.TTT` dict as it is) becomes an `MTTTMixer` with the same outputs.
- `export_mttt_layer(layer, variables) -> tree`: the inverse.

mttt `TTTLayer` layout (dh = C/H; all keys at the top level of the layer's dict):
"psi/kernel", "phi/kernel" (H, C, dh); "psi/bias", "phi/bias" (H, dh); "g/kernel", "h/kernel"
(H, dh, C); g_bias, h_bias (1, C); "inner_Dense_0/kernel" (H, dh, dh) (mlp_1) or (H, dh, 4dh)
(mlp_2) and "inner_Dense_1/kernel" (H, 4dh, dh) (mlp_2), each with an optional "/bias" (H, out);
optional "decoder_LN/scale", "decoder_LN/bias" (H, C). Ours nests the same names. The inner-loop
settings (inner_itr, inner_lr, SGD) are config, not parameters.

Export writes the official nesting: the quoted keys above (`_MTTT_LITERAL_GROUPS`) as single keys
containing '/', as the official module creates them; `nested=True` splits those too. Import reads
either form.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttt import layers
from ttt.interop.trees import check_like, flatten, nest, param_dtype, require, strip_params

__all__ = ["export_mttt_layer", "import_mttt_layer"]

# Official multi-head parameters: one key containing '/' at the top level of the layer's dict.
_MTTT_LITERAL_GROUPS = ("psi", "phi", "g", "h", "inner_Dense_0", "inner_Dense_1", "decoder_LN")
_MTTT_ALIASES = {"inner_itr": "steps", "inner_lr": "lrs", "SGD": "mode"}
# Keys of the official `config.inner.TTT` dict that describe the tree (checked against it) or only
# its initialisation (ignored on import); inner_itr, inner_lr and SGD are aliases above.
_MTTT_OFFICIAL = ("inner_encoder", "inner_encoder_init", "inner_encoder_bias", "decoder_LN",
                  "train_init", "num_heads", "width")


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
    flat = strip_params(flatten(tree))
    H, C, dh = np.shape(require(flat, "psi/kernel", "mttt TTTLayer"))
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
    pdt = param_dtype(dtype_name)
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
    params = nest({k: jnp.asarray(v, pdt) for k, v in flat.items()})
    x = jnp.zeros((1, 2, int(C)), pdt)
    target = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    check_like(params, target, "import_mttt_layer")
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
    flat = flatten(dict(variables.get("params", variables)))
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

    tree = nest(flat, literal)
    return {"params": tree} if params_key else tree
