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


class LoopStack(nn.Module):
    """Unrolled stack: `num_layers` blocks named "0", "1", ...; same methods as the scanned stack.

    `per_layer` maps a method name to one flag per positional argument (after the carry): True
    means the argument has a leading layer axis to slice, False means every layer gets it whole.
    """

    block: Callable[..., nn.Module]
    num_layers: int
    per_layer: tuple[tuple[str, tuple[bool, ...]], ...]

    def setup(self):
        self.layers = [self.block(name=str(i)) for i in range(self.num_layers)]

    def _loop(self, method: str, carry, *args):
        flags = dict(self.per_layer)[method]
        outs = []
        for i, layer in enumerate(self.layers):
            layer_args = [jax.tree.map(lambda a, i=i: a[i], a) if f else a
                          for a, f in zip(args, flags, strict=True)]
            carry, out = getattr(layer, method)(carry, *layer_args)
            outs.append(out)
        return carry, _stack_trees(outs)

    def __call__(self, carry, *args):
        return self._loop("__call__", carry, *args)

    def prefill(self, carry, *args):
        return self._loop("prefill", carry, *args)

    def step(self, carry, *args):
        return self._loop("step", carry, *args)

    def init_cache(self, carry, *args):
        return self._loop("init_cache", carry, *args)


def make_stack(block: Callable[..., nn.Module], num_layers: int, *, scan: bool, remat: str,
               per_layer: Mapping[str, tuple[bool, ...]], static_argnums: tuple[int, ...] = (),
               rng_names: tuple[str, ...] = ("params",), name: str = "h") -> nn.Module:
    """Build a stack of `num_layers` copies of `block` (a module class or functools.partial).

    Args:
      per_layer: method name -> one flag per positional argument after the carry (see LoopStack).
      static_argnums: arguments of `block.__call__` that remat must treat as static (self is 0).
      rng_names: RNG streams split across layers (params always, plus e.g. "inner").
      remat: one of REMAT_CHOICES; wraps `__call__` only (decoding never needs gradients).
    """
    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat: unknown {remat!r}; known: {', '.join(REMAT_CHOICES)}")
        # prevent_cse is only needed outside scan (scan already stops XLA from merging recompute).
        block = nn.remat(block, policy=REMAT_POLICIES[remat], prevent_cse=not scan,
                         static_argnums=static_argnums)
    if not scan:
        return LoopStack(block=block, num_layers=num_layers,
                         per_layer=tuple((m, tuple(f)) for m, f in per_layer.items()), name=name)
    methods = {
        m: dict(variable_axes={"params": 0}, split_rngs={r: True for r in rng_names},
                in_axes=tuple(0 if f else nn.broadcast for f in flags), length=num_layers)
        for m, flags in per_layer.items()
    }
    return nn.scan(block, methods=methods)(name=name)


def _is_layer_index(key) -> bool:
    return isinstance(key, str) and key.isdigit()


def unstack_layers(params: Mapping, stack_name: str = "h") -> dict:
    """Scanned layout -> unrolled layout: `<..>/h/<leaf> (L, ...)` -> `<..>/h/<i>/<leaf> (...)`.

    Works on any subtree containing `stack_name` (e.g. variables["params"] or a ViT's
    "Transformer" subtree); everything else is returned unchanged.
    """
    out = {}
    for k, v in params.items():
        if k == stack_name and isinstance(v, Mapping):
            leaves = jax.tree.leaves(v)
            if leaves and all(_is_layer_index(i) for i in v):
                out[k] = dict(v)  # already unrolled
                continue
            num_layers = leaves[0].shape[0]
            out[k] = {str(i): jax.tree.map(lambda a, i=i: a[i], dict(v)) for i in range(num_layers)}
        elif isinstance(v, Mapping):
            out[k] = unstack_layers(v, stack_name)
        else:
            out[k] = v
    return out


def stack_layers(params: Mapping, stack_name: str = "h") -> dict:
    """Unrolled layout -> scanned layout (inverse of `unstack_layers`)."""
    out = {}
    for k, v in params.items():
        if k == stack_name and isinstance(v, Mapping) and v and all(_is_layer_index(i) for i in v):
            layers = [v[str(i)] for i in range(len(v))]
            out[k] = _stack_trees([jax.tree.map(lambda a: a, dict(layer)) for layer in layers])
        elif isinstance(v, Mapping):
            out[k] = stack_layers(v, stack_name)
        else:
            out[k] = v
    return out
