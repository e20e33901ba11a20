"""Argument checks shared by the ops: errors a user can hit are raised in words, not XLA traces."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def check_rank(name: str, x, rank: int, layout: str) -> None:
    """Raise ValueError unless `x` has `rank` dims; `layout` names them, e.g. '(B, H, N, d)'."""
    shape = jnp.shape(x)
    if len(shape) != rank:
        raise ValueError(f"{name}: expected a rank-{rank} array {layout}, got shape {tuple(shape)}")


def check_shape(name: str, x, expected: Sequence[int | None], layout: str, like: str = "") -> None:
    """Raise ValueError unless `x.shape` matches `expected` (None matches any size)."""
    shape = tuple(jnp.shape(x))
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected, shape, strict=True)
    )
    if not ok:
        want = tuple("*" if e is None else e for e in expected)
        suffix = f" (to match {like})" if like else ""
        raise ValueError(f"{name}: expected shape {layout} = {want}{suffix}, got {shape}")


def check_floating(name: str, x) -> None:
    """Raise ValueError unless `x` has a floating dtype."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: expected a floating-point array, got dtype {dtype}")


def check_same_dtype(**arrays) -> None:
    """Raise ValueError unless all arrays share one dtype (mixing silently promotes/truncates)."""
    dtypes = {name: jnp.result_type(a) for name, a in arrays.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n}={d}" for n, d in dtypes.items())
        raise ValueError(f"arguments must share one dtype, got {listing}; cast them with .astype")


def check_leading(name: str, tree, lead: Sequence[int], layout: str) -> None:
    """Raise ValueError unless every leaf of `tree` starts with the axes `lead`."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = tuple(jnp.shape(leaf))
        if shape[: len(lead)] != tuple(lead):
            where = jax.tree_util.keystr(path)
            raise ValueError(
                f"{name}{where}: expected leading axes {layout} = {tuple(lead)}, got shape {shape}"
            )


def check_int(name: str, value, minimum: int) -> None:
    """Raise ValueError unless `value` is a Python int >= `minimum` (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    """Raise ValueError unless `value` is one of `choices`, listing them."""
    if value not in choices:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(choices)}")
