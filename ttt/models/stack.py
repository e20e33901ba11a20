"""A stack of identical blocks, either scanned (`nn.scan`) or unrolled, with optional remat.

Both layouts expose the same methods with scan's calling convention
`method(carry, *args) -> (carry, per_layer_outputs)`, where per-layer outputs come back stacked on a
leading layer axis and the arguments listed in `per_layer` are sliced along it. Only the
parameter tree differs: scanned params live at `<stack>/<leaf>` with a leading (layers,) axis,
unrolled ones at `<stack>/<i>/<leaf>`. `stack_layers` / `unstack_layers` convert between the
two, so a checkpoint written in one layout loads in the other.

Scanning keeps compile time flat in depth; unrolling gives the per-layer names of the official
checkpoints (`h/0`, `h/1`, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# remat choice -> checkpoint policy (None = save nothing, recompute the whole block on backward).
REMAT_POLICIES: dict[str, Callable | None] = {
    "block": None,
    "block_dots": jax.checkpoint_policies.dots_saveable,
    "block_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def _stack_trees(trees: list) -> Any:
    """Stack a list of identical pytrees along a new leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def position_name(j: int) -> str:
    """The name of the j-th block of a hybrid unit (its params, aux and cache key)."""
    return f"pattern_{j}"


def _by_position(outs: dict) -> Any:
    """{pattern_j: out_j} -> the same, or a tuple of such dicts when each out_j is a tuple."""
    first = next(iter(outs.values()))
    if isinstance(first, tuple):
        return tuple({key: out[i] for key, out in outs.items()} for i in range(len(first)))
    return outs


def _position_args(args, flags, j: int) -> list:
    """The per-layer arguments of block j of a unit: its entry of each per-layer dict."""
    return [a[position_name(j)] if f else a for a, f in zip(args, flags, strict=True)]


class PatternUnit(nn.Module):
    """One repeat of a hybrid pattern: blocks `pattern_0`, ..., `pattern_<k-1>` applied in order.

    The body of a scanned hybrid stack; same calling convention and `per_layer` flags as
    LoopStack, its per-layer arguments and outputs keyed by position (see the module doc).
    """

    blocks: tuple[Callable[..., nn.Module], ...]
    per_layer: tuple[tuple[str, tuple[bool, ...]], ...]

    def setup(self):
        self.layers = [block(name=position_name(j)) for j, block in enumerate(self.blocks)]

    def _unit(self, method: str, carry, *args):
        flags = dict(self.per_layer)[method]
        outs = {}
        for j, layer in enumerate(self.layers):
            carry, outs[position_name(j)] = getattr(layer, method)(
                carry, *_position_args(args, flags, j))
        return carry, _by_position(outs)

    def __call__(self, carry, *args):
        return self._unit("__call__", carry, *args)

    def prefill(self, carry, *args):
        return self._unit("prefill", carry, *args)

    def step(self, carry, *args):
        return self._unit("step", carry, *args)

    def init_cache(self, carry, *args):
        return self._unit("init_cache", carry, *args)


class LoopStack(nn.Module):
    """Unrolled stack: `num_layers` blocks named "0", "1", ...; same methods as the scanned stack.

    `per_layer` maps a method name to one flag per positional argument (after the carry): True
    means the argument has a leading layer axis to slice, False means every layer gets it whole.
    `unit` holds the blocks of a hybrid pattern (layer i is `unit[i % k]`; per-layer arguments and
    outputs keyed by position, see the module doc); empty: every layer is `block`.
    """

    block: Callable[..., nn.Module] | None
    num_layers: int
    per_layer: tuple[tuple[str, tuple[bool, ...]], ...]
    unit: tuple[Callable[..., nn.Module], ...] = ()

    def setup(self):
        k = len(self.unit)
        self.layers = [(self.unit[i % k] if k else self.block)(name=str(i))
                       for i in range(self.num_layers)]

    def _loop(self, method: str, carry, *args):
        flags = dict(self.per_layer)[method]
        k = len(self.unit)
        outs = []
        for i, layer in enumerate(self.layers):
            r, sliced = (i // k, _position_args(args, flags, i % k)) if k else (i, args)
            layer_args = [jax.tree.map(lambda a, r=r: a[r], a) if f else a
                          for a, f in zip(sliced, flags, strict=True)]
            carry, out = getattr(layer, method)(carry, *layer_args)
            outs.append(out)
        if not k:
            return carry, _stack_trees(outs)
        return carry, _by_position({position_name(j): _stack_trees(outs[j::k])
                                    for j in range(k)})

    def __call__(self, carry, *args):
        return self._loop("__call__", carry, *args)

    def prefill(self, carry, *args):
        return self._loop("prefill", carry, *args)

    def step(self, carry, *args):
        return self._loop("step", carry, *args)

    def init_cache(self, carry, *args):
        return self._loop("init_cache", carry, *args)


def make_stack(block, num_layers: int, *, scan: bool, remat: str,
               per_layer: Mapping[str, tuple[bool, ...]], static_argnums: tuple[int, ...] = (),
               rng_names: tuple[str, ...] = ("params",), name: str = "h") -> nn.Module:
    """Build a stack of `num_layers` blocks.

    Args:
      block: a module class or functools.partial (every layer the same), or a sequence of k of
        them, the unit of a hybrid pattern repeated num_layers / k times (k must divide it; a
        sequence of one is the plain stack).
      per_layer: method name -> one flag per positional argument after the carry (see LoopStack).
      static_argnums: arguments of `block.__call__` that remat must treat as static (self is 0).
      rng_names: RNG streams split across layers (params always, plus e.g. "inner").
      remat: one of REMAT_CHOICES; wraps each block's `__call__` only (decoding never needs
        gradients).
    """
    unit = tuple(block) if isinstance(block, (tuple, list)) else (block,)
    if num_layers % len(unit):
        raise ValueError(f"model.num_layers={num_layers} is not a multiple of the pattern's "
                         f"{len(unit)} layers")
    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat: unknown {remat!r}; known: {', '.join(REMAT_CHOICES)}")
        # prevent_cse is only needed outside scan (scan already stops XLA from merging recompute).
        unit = tuple(nn.remat(b, policy=REMAT_POLICIES[remat], prevent_cse=not scan,
                              static_argnums=static_argnums) for b in unit)
    flags = tuple((m, tuple(f)) for m, f in per_layer.items())
    hybrid = len(unit) > 1
    if not scan:
        return LoopStack(block=None if hybrid else unit[0], num_layers=num_layers,
                         per_layer=flags, unit=unit if hybrid else (), name=name)
    methods = {
        m: dict(variable_axes={"params": 0}, split_rngs={r: True for r in rng_names},
                in_axes=tuple(0 if f else nn.broadcast for f in f_m),
                length=num_layers // len(unit))
        for m, f_m in per_layer.items()
    }
    if hybrid:
        return nn.scan(PatternUnit, methods=methods)(blocks=unit, per_layer=flags, name=name)
    return nn.scan(unit[0], methods=methods)(name=name)


def _is_layer_index(key) -> bool:
    return isinstance(key, str) and key.isdigit()


def _take(a, i: int):
    """a[i]; for a `jax.eval_shape` struct, the struct of a[i]."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i]


def _is_unit(v) -> bool:
    return isinstance(v, Mapping) and bool(v) and all(
        isinstance(k, str) and k.startswith("pattern_") for k in v)


def unstack_layers(params: Mapping, stack_name: str = "h") -> dict:
    """Scanned layout -> unrolled layout: `<..>/h/<leaf> (L, ...)` -> `<..>/h/<i>/<leaf> (...)`,
    and for a hybrid `<..>/h/pattern_<j>/<leaf> (L / k, ...)` -> `<..>/h/<r k + j>/<leaf>`.

    Works on any subtree containing `stack_name` (e.g. variables["params"] or a ViT's
    "Transformer" subtree), of arrays or `jax.eval_shape` structs; everything else is returned
    unchanged.
    """
    out = {}
    for k, v in params.items():
        if k == stack_name and _is_unit(v):
            unit = len(v)
            repeats = jax.tree.leaves(v)[0].shape[0]
            out[k] = {str(r * unit + j): jax.tree.map(lambda a, r=r: _take(a, r),
                                                      dict(v[position_name(j)]))
                      for r in range(repeats) for j in range(unit)}
        elif k == stack_name and isinstance(v, Mapping):
            leaves = jax.tree.leaves(v)
            if leaves and all(_is_layer_index(i) for i in v):
                out[k] = dict(v)  # already unrolled
                continue
            num_layers = leaves[0].shape[0]
            out[k] = {str(i): jax.tree.map(lambda a, i=i: _take(a, i), dict(v))
                      for i in range(num_layers)}
        elif isinstance(v, Mapping):
            out[k] = unstack_layers(v, stack_name)
        else:
            out[k] = v
    return out


def stack_layers(params: Mapping, stack_name: str = "h", unit: int = 1) -> dict:
    """Unrolled layout -> scanned layout (inverse of `unstack_layers`); `unit` > 1: the scanned
    layout of a hybrid pattern of `unit` layers (layer i goes to `pattern_<i mod unit>`)."""
    out = {}
    for k, v in params.items():
        if k == stack_name and isinstance(v, Mapping) and v and all(_is_layer_index(i) for i in v):
            layers = [dict(v[str(i)]) for i in range(len(v))]
            if len(layers) % unit:
                raise ValueError(f"stack_layers: {len(layers)} layers are not a multiple of the "
                                 f"pattern's {unit}")
            if unit == 1:
                out[k] = _stack_trees(layers)
            else:
                out[k] = {position_name(j): _stack_trees(layers[j::unit]) for j in range(unit)}
        elif isinstance(v, Mapping):
            out[k] = stack_layers(v, stack_name, unit)
        else:
            out[k] = v
    return out
