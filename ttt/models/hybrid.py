"""Hybrid stacks: a per-layer pattern of mixers, repeated to the model's depth.

`model.pattern` is a list of registry names or one comma-separated string
("ttt_linear,ttt_linear,ttt_linear,softmax"), repeated num_layers / len(pattern) times (the length
must divide num_layers). Empty (the default) means every layer is `model.mixer`: the plain stack,
with the same parameter tree as before patterns existed. With a pattern, `model.mixer` is not
read to build the model.

Notable choices:
- `model.mixer_kwargs` with a pattern: a top-level key that is a registry name holds that
  mixer's own arguments (`mixer_kwargs.softmax = {"cache_size": 4096}`); every other (flat) key
  goes to each mixer of the pattern that accepts it (`stats=False` reaches the TTT layers and not
  the attention) and must be accepted by at least one. A per-name argument wins over a flat one.
- The LM's pre-convolution: `model.pre_conv` when set (every layer), else each entry's registry
  default (on before a Mamba-backbone TTT layer, off elsewhere).
- The ViT takes each entry's non-causal twin; a non-causal entry is used as it is, and a causal
  entry without a twin is an error.
- The stack scans over repeats of the pattern (`ttt.models.stack.PatternUnit`); its layout is
  described in ttt/models/stack.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from ttt import layers
from ttt.models.presets import model_sizes
from ttt.models.stack import position_name, unstack_layers


class Layer(NamedTuple):
    """One entry of a resolved pattern: the registry name its blocks build, their keyword
    arguments as sorted (key, value) pairs, and whether an LM block puts the pre-conv first."""

    mixer: str
    mixer_kwargs: tuple = ()
    pre_conv: bool = False


def parse_pattern(value) -> tuple[str, ...]:
    """A config's `model.pattern` (None, a comma-separated string or a list of names) -> names.

    ValueError (one line) for an entry that is not a registry name."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        names = tuple(part.strip() for part in value.split(","))
    elif isinstance(value, (list, tuple)):
        names = tuple(value)
    else:
        raise ValueError(f"model.pattern must be a comma-separated string or a list of mixer "
                         f"names, got {type(value).__name__}")
    for name in names:
        if not isinstance(name, str) or name not in layers.MIXERS:
            raise ValueError(f"model.pattern: unknown mixer {name!r} in "
                             f"{','.join(map(str, names))}; known: {', '.join(layers.MIXERS)}")
    return names


def _built_name(kind: str, name: str) -> str:
    """The registry entry a model of `kind` builds for pattern entry `name`."""
    spec = layers.MIXERS[name]
    if kind == "lm":
        if not spec.causal:
            causal = [n for n, s in layers.MIXERS.items() if s.causal]
            raise ValueError(f"model.pattern: {name!r} is non-causal (it sees future tokens); a "
                             f"causal LM needs one of {', '.join(causal)}")
        return name
    if spec.noncausal:
        return spec.noncausal
    if spec.causal:
        raise ValueError(f"model.pattern: {name!r} has no non-causal twin for the ViT; use a "
                         "mixer with one (softmax, linear_attention, lact) or a non-causal one "
                         "(mttt_linear, mttt_mlp)")
    return name


def resolve_pattern(kind: str, names: tuple[str, ...], mixer_kwargs: Mapping | None,
                    num_layers: int) -> list[tuple[str, dict[str, Any]]]:
    """(registry name built, its keyword arguments) for each pattern entry (see the module doc).

    ValueError (one line) for a length that does not divide num_layers, per-name arguments for
    a mixer outside the pattern or not given as a dict, or a flat argument no entry accepts.
    Argument values are checked when the mixers are built."""
    if num_layers % len(names):
        raise ValueError(f"model.pattern has {len(names)} entries, which must divide "
                         f"model.num_layers={num_layers}")
    kwargs = dict(mixer_kwargs or {})
    per_name = {k: v for k, v in kwargs.items() if k in layers.MIXERS}
    flat = {k: v for k, v in kwargs.items() if k not in layers.MIXERS}
    for name, value in per_name.items():
        if name not in names:
            raise ValueError(f"model.mixer_kwargs.{name}: {name!r} is not in the pattern "
                             f"{','.join(names)}")
        if hasattr(value, "to_dict"):
            per_name[name] = value = value.to_dict()
        if not isinstance(value, Mapping):
            raise ValueError(f"model.mixer_kwargs.{name} must be a dict of {name}'s arguments, "
                             f"got {value!r}")
    built = [_built_name(kind, name) for name in names]
    unused = [k for k in flat if not any(k in layers.accepted_kwargs(b) for b in built)]
    if unused:
        raise ValueError(f"model.mixer_kwargs.{unused[0]}: no mixer of the pattern "
                         f"{','.join(names)} accepts it")
    out = []
    for name, b in zip(names, built, strict=True):
        own = {k: v for k, v in flat.items() if k in layers.accepted_kwargs(b)}
        own.update(per_name.get(name, {}))
        layers.MIXERS[b].check_kwargs(own)
        out.append((b, own))
    return out


def check_pattern(model_config) -> None:
    """ValueError (one line) for anything wrong with a config's pattern: names, length, kwargs
    and their values (each entry's mixer is built, unbound, at the config's width and heads)."""
    get = model_config.get if hasattr(model_config, "get") else lambda k, d=None: getattr(
        model_config, k, d)
    names = parse_pattern(get("pattern"))
    if not names:
        return
    sizes = model_sizes(model_config)
    kwargs = get("mixer_kwargs")
    kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else kwargs
    for name, own in resolve_pattern(get("kind"), names, kwargs, int(sizes["num_layers"] or 1)):
        layers.make_mixer(name, int(sizes["width"] or 16), int(sizes["num_heads"] or 1), **own)


def layer_mixers(model) -> tuple[Layer, ...]:
    """The unit of a built CausalLM or ViT: its pattern, or the one mixer every layer has."""
    if model.pattern:
        return tuple(model.pattern)
    return (Layer(model.mixer, tuple(model.mixer_kwargs), bool(getattr(model, "pre_conv", False))),)


def layer_table(model, params: Mapping, seq_len: int) -> list[dict[str, Any]]:
    """One row per position of the LM's unit: {"position", "mixer", "layers" (how many layers
    run it), "params" (per layer), "state" (recurrent state, floats per layer per sequence at
    `seq_len`)}. `params` may be real arrays or `jax.eval_shape` structs, in either layout."""
    unit = layer_mixers(model)
    stack = unstack_layers(dict(params.get("params", params)))["h"]
    rows = []
    for j, layer in enumerate(unit):
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(stack[str(j)]))
        state = layers.state_size(layer.mixer, model.width, model.num_heads, seq_len,
                                  **dict(layer.mixer_kwargs))
        rows.append({"position": position_name(j), "mixer": layer.mixer,
                     "layers": model.num_layers // len(unit), "params": count, "state": state})
    return rows
