"""Parameter-tree helpers shared by the ttt-lm-jax and mttt mappings (and `ttt.train`'s
Transformer -> TTT initialisation): '/'-joined flattening and nesting, shape checks against a
model, and our CausalLM built from a `model_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ttt.models import build_model, without_diagnostics


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}; keys that already contain '/' flatten the same way."""
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {f"{prefix}{k}": v for k, v in flat.items()}


def nest(flat: Mapping[str, Any], literal: Callable[[list[str]], bool] = lambda p: False) -> dict:
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


def strip_params(flat: dict[str, Any]) -> dict[str, Any]:
    if flat and all(k.startswith("params/") for k in flat):
        return {k[len("params/"):]: v for k, v in flat.items()}
    return flat


def check_like(params: Mapping, target: Mapping, what: str) -> None:
    """ValueError unless `params` has exactly the paths and shapes of `target` (eval_shape tree)."""
    got = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    want = {k: tuple(v.shape) for k, v in flatten(target).items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: shape {got[k]}, expected {want[k]}"
                 for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    if problems:
        raise ValueError(f"{what}: the parameter tree does not fit the model: "
                         + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else ""))


def param_dtype(dtype_name: str):
    return jnp.float64 if dtype_name == "float64" else jnp.float32


def require(flat: Mapping, key: str, what: str):
    if key not in flat:
        raise ValueError(f"{what}: no parameter {key!r} (keys: {', '.join(sorted(flat)[:20])})")
    return flat[key]


def build_lm(config) -> nn.Module:
    """build_model plus the two fields it does not read (pre-conv width, RMSNorm eps)."""
    model = build_model(config)
    extra = {k: config[k] for k in ("conv_width", "norm_eps")
             if k in config and config[k] != getattr(model, k)}
    return model.clone(**extra) if extra else model


def lm_model(model_or_config) -> nn.Module:
    return model_or_config if isinstance(model_or_config, nn.Module) else build_lm(
        model_or_config)


def lm_target(model) -> dict:
    """Parameter shapes of `model` (traced, not allocated; TTT diagnostics off: no params)."""
    model = without_diagnostics(model)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), ids)["params"]
