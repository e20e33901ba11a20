"""`build_model(model_config)`: the one entry point from a config to a Flax module.

Every field is checked before anything is traced, and a bad one fails with a one-line message
naming the key and, where there is a closed set, the known values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttt import layers
from ttt.models.hybrid import Layer, parse_pattern, resolve_pattern
from ttt.models.lm import CausalLM
from ttt.models.presets import PRESETS, SIZE_FIELDS, model_sizes
from ttt.models.stack import REMAT_CHOICES
from ttt.models.vit import ViT
from ttt.ops import checks

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def _get(cfg, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def model_mixer(kind: str, mixer) -> str:
    """The registry name a model of `kind` builds for `mixer`.

    A classifier sees the whole image, so a ViT takes the entry's non-causal twin where it has
    one ("softmax" -> "softmax_noncausal"); a causal LM needs an entry with a decode path.
    """
    if not isinstance(mixer, str) or mixer not in layers.MIXERS:
        raise ValueError(f"model.mixer: unknown {mixer!r}; known: {', '.join(layers.MIXERS)}")
    spec = layers.MIXERS[mixer]
    if kind == "vit":
        return spec.noncausal or mixer
    if not spec.causal:
        causal = [name for name, s in layers.MIXERS.items() if s.causal]
        raise ValueError(f"model.mixer: {mixer!r} is non-causal (it sees future tokens); a "
                         f"causal LM needs one of {', '.join(causal)}")
    return mixer


def _choice(value, key: str, known) -> Any:
    checks.check_choice(f"model.{key}", value, known)
    return value


def _positive_int(cfg, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"model.{key} must be a positive int, got {value!r}")
    return int(value)


def _frozen_kwargs(kwargs) -> tuple:
    """mixer_kwargs (dict / ConfigDict / None) -> sorted (key, value) pairs (hashable)."""
    if kwargs is None:
        return ()
    if hasattr(kwargs, "to_dict"):
        kwargs = kwargs.to_dict()
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"model.mixer_kwargs must be a dict, got {type(kwargs).__name__}")
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v)
                        for k, v in kwargs.items()))


def _registry_pre_conv(mixer: str, kwargs: Mapping) -> bool:
    """Whether an LM block puts its pre-conv before `mixer` by default (the Mamba backbone)."""
    spec = layers.MIXERS[mixer]
    return bool(spec.pre_conv(spec.attrs(**dict(kwargs))))


def build_model(model_config) -> nn.Module:
    """Build a CausalLM (kind "lm") or ViT (kind "vit") from a config (see interfaces).

    Fields: kind, preset, mixer, mixer_kwargs, dtype, scan_layers, remat; LM: vocab_size;
    ViT: num_classes, image_size, patch_size, channels; the mixer resolves by `model_mixer`
    (a ViT takes the registry's non-causal twin). Optional overrides of the preset's dimensions
    (num_layers, width, num_heads, ffn_dim / mlp_dim) and, for the LM, pre_conv (default: the
    registry's `pre_conv` of the resolved mixer attributes, i.e. on for the Mamba backbone).
    Optional `pattern`: a hybrid stack (ttt/models/hybrid.py), which replaces `mixer`.
    """
    kind = _choice(_get(model_config, "kind"), "kind", sorted(PRESETS))
    preset = _choice(_get(model_config, "preset"), "preset", list(PRESETS[kind]))
    for key in SIZE_FIELDS[kind]:  # the sizes the config sets itself (e.g. a narrower model)
        if _get(model_config, key) is not None:
            _positive_int(model_config, key)
    dims = {key: int(value) for key, value in model_sizes(model_config).items()}

    mixer = model_mixer(kind, _get(model_config, "mixer"))
    names = parse_pattern(_get(model_config, "pattern"))
    if names:
        raw = _get(model_config, "mixer_kwargs")
        raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
        if raw is not None and not isinstance(raw, Mapping):
            raise ValueError(f"model.mixer_kwargs must be a dict, got {type(raw).__name__}")
        pattern = resolve_pattern(kind, names, raw, dims["num_layers"])
        mixer, mixer_kwargs = ",".join(names), ()
        if len(pattern) == 1:  # one entry: the plain stack of that mixer
            mixer, kwargs = pattern.pop()
            mixer_kwargs = _frozen_kwargs(kwargs)
    else:
        pattern, mixer_kwargs = [], _frozen_kwargs(_get(model_config, "mixer_kwargs"))
    if dims["width"] % dims["num_heads"]:
        raise ValueError(f"model: width {dims['width']} is not divisible by num_heads "
                         f"{dims['num_heads']} (preset {preset!r})")
    dtype_name = _choice(_get(model_config, "dtype", "float32"), "dtype", list(_DTYPES))
    if dtype_name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("model.dtype: 'float64' needs jax x64 mode (jax.enable_x64)")
    dtype = _DTYPES[dtype_name]
    # Parameters stay float32 under bf16 compute; float64 runs keep everything in float64.
    param_dtype = jnp.float64 if dtype_name == "float64" else jnp.float32
    remat = _choice(_get(model_config, "remat", "none") or "none", "remat", REMAT_CHOICES)
    common = dict(mixer=mixer, mixer_kwargs=mixer_kwargs, dtype=dtype, param_dtype=param_dtype,
                  scan_layers=bool(_get(model_config, "scan_layers", True)), remat=remat,
                  num_layers=dims["num_layers"], width=dims["width"],
                  num_heads=dims["num_heads"])
    pre_conv = _get(model_config, "pre_conv") if kind == "lm" else False
    if pattern:
        common["pattern"] = tuple(
            Layer(name, _frozen_kwargs(kwargs), bool(_registry_pre_conv(name, kwargs)
                                                     if pre_conv is None else pre_conv))
            for name, kwargs in pattern)

    if kind == "lm":
        if pre_conv is None:
            pre_conv = False if pattern else _registry_pre_conv(mixer, dict(mixer_kwargs))
        return CausalLM(vocab_size=dims["vocab_size"], ffn_dim=dims["ffn_dim"],
                        pre_conv=bool(pre_conv), **common)

    _positive_int(model_config, "num_classes")
    image_size = _positive_int(model_config, "image_size")
    _positive_int(model_config, "channels")
    patch_size = _get(model_config, "patch_size", 16)
    if not isinstance(patch_size, int) or patch_size < 0 or (
            patch_size and image_size % patch_size):
        raise ValueError(f"model.patch_size must be 0 (pixels) or divide image_size "
                         f"{image_size}, got {patch_size!r}")
    if patch_size and dims["width"] % 4:
        raise ValueError(f"model: width {dims['width']} must be a multiple of 4 for the "
                         "sin-cos position embedding")
    return ViT(num_classes=int(_get(model_config, "num_classes")), mlp_dim=dims["mlp_dim"],
               patch_size=patch_size, **common)


def _stats_off(mixer: str, kwargs: tuple) -> tuple | None:
    """`kwargs` with the diagnostic pass off, or None when `mixer` has none or it is off."""
    if mixer not in layers.MIXERS or "stats" not in layers.accepted_kwargs(mixer):
        return None
    kw = dict(kwargs)
    if not layers.MIXERS[mixer].attrs(**kw)["stats"]:
        return None
    return _frozen_kwargs({**kw, "stats": False})


def without_diagnostics(model: nn.Module) -> nn.Module:
    """`model` with its mixers' diagnostic pass off (the TTT layer's `stats`: the inner-loss
    statistics, one extra no-grad inner pass per layer), or `model` itself when it has none or it
    is off already. The parameter tree is the same; the trainer runs this model on the steps
    that do not log diagnostics (`train.diag_every`). A hybrid's entries are switched alike."""
    pattern = getattr(model, "pattern", ())
    if pattern:
        off = [_stats_off(layer.mixer, layer.mixer_kwargs) for layer in pattern]
        if not any(kw is not None for kw in off):
            return model
        return model.clone(pattern=tuple(
            layer if kw is None else layer._replace(mixer_kwargs=kw)
            for layer, kw in zip(pattern, off, strict=True)))
    kwargs = _stats_off(getattr(model, "mixer", None), getattr(model, "mixer_kwargs", ()))
    return model if kwargs is None else model.clone(mixer_kwargs=kwargs)


def param_count(variables) -> int:
    """Number of scalars in `variables["params"]` (or in the whole tree if it has no "params").

    Works on arrays and on `jax.eval_shape` outputs (ShapeDtypeStruct), so presets can be counted
    without allocating them.
    """
    tree = variables.get("params", variables) if isinstance(variables, Mapping) else variables
    return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))
