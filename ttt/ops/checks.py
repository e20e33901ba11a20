"""Argument checks shared by the ops: errors a user can hit are raised in words, not XLA traces."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def check_qkv(q, k, v, d: str = "d_in", dv: str = "d_out") -> None:
    """q, k (B, H, N, d) with N >= 1 and v (B, H, N, dv): the inputs of every inner loop and
    attention form (`d`, `dv`: how the messages name the last axes)."""
    check_rank("q", q, 4, f"(B, H, N, {d})")
    B, H, N, d_in = q.shape
    if N < 1:
        raise ValueError(f"q: expected at least one token (N >= 1), got shape {tuple(q.shape)}")
    check_shape("k", k, (B, H, N, d_in), f"(B, H, N, {d})", like="q")
    check_shape("v", v, (B, H, N, None), f"(B, H, N, {dv})", like="q")


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


def check_attention_qkv(q, k, v) -> None:
    """The attention ops' inputs: q, k (B, H, N, d) alike; v (B, H, N, dv); one floating dtype."""
    check_qkv(q, k, v, "d", "dv")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_floating(name, x)
    check_same_dtype(q=q, k=k, v=v)


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


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise ValueError unless `value` is one of `choices`, listing them."""
    if value not in choices:
        raise ValueError(f"{name}: unknown {value!r}; known: {', '.join(map(str, choices))}")


def inner_state_layout(learner, W0, B: int, H: int, d_in: int, what: str = "W0") -> bool:
    """Check an inner state against its learner; True when it leads with (B, H), False for (H,).

    W0 must have the structure of `learner.init(key, d_in)` with every leaf shaped (H, ...) (one
    state per head, shared over the batch) or (B, H, ...) (one per sequence), floating point.
    """
    if not (hasattr(learner, "init") and hasattr(learner, "apply")):
        raise ValueError(f"learner: expected a Learner (name, init, apply, ...), got {learner!r}")
    per_head = jax.eval_shape(lambda key: learner.init(key, d_in), jax.random.PRNGKey(0))
    structure = jax.tree_util.tree_structure
    if structure(W0) != structure(per_head):
        raise ValueError(
            f"{what}: expected a pytree like {learner.name}.init(key, {d_in}) with leading H, "
            f"got structure {structure(W0)}, expected {structure(per_head)}"
        )
    leads = set()
    for (path, w), ref in zip(
        jax.tree_util.tree_leaves_with_path(W0), jax.tree_util.tree_leaves(per_head), strict=True
    ):
        shape, tail = tuple(jnp.shape(w)), tuple(ref.shape)
        where = what + jax.tree_util.keystr(path)
        if shape == (H, *tail):
            leads.add(1)
        elif shape == (B, H, *tail):
            leads.add(2)
        else:
            raise ValueError(
                f"{where}: expected shape (H, ...) = {(H, *tail)} or (B, H, ...) = "
                f"{(B, H, *tail)}, got {shape}"
            )
        check_floating(where, w)
    if len(leads) > 1:
        raise ValueError(f"{what}: leaves mix leading (H,) and (B, H) axes; use one for all")
    return leads == {2}


def check_heads(owner: str, width: int, num_heads: int, even_head_dim: bool) -> int:
    """Validate width/num_heads (and an even head dim for RoPE); return the head dim d."""
    if not (isinstance(width, int) and width > 0 and isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(
            f"{owner}: width and num_heads must be positive ints, got {width}, {num_heads}"
        )
    if width % num_heads:
        raise ValueError(f"{owner}: width {width} is not divisible by num_heads {num_heads}")
    d = width // num_heads
    if even_head_dim and d % 2:
        raise ValueError(
            f"{owner}: RoPE needs an even head dim, got width/num_heads = {d}; change the "
            f"width or heads, or pass rope=False"
        )
    return d


def check_input(owner: str, x, width: int, name: str = "x") -> None:
    """ValueError unless x is a floating (B, N, C=width) array with N >= 1."""
    shape = tuple(jnp.shape(x))
    if len(shape) != 3 or shape[-1] != width or shape[1] < 1:
        raise ValueError(f"{owner}: {name} must be (B, N, C={width}) with N >= 1, got {shape}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{owner}: {name} must be floating point, got {jnp.result_type(x)}")


def check_step(owner: str, x_t, cache, keys, width: int, batch_key: str | None = None) -> None:
    """A one-token decode call: x_t (B, 1, C=width), `cache` a dict with exactly `keys`; with
    `batch_key`, the leaves of cache[batch_key] lead with the same B."""
    if jnp.ndim(x_t) != 3 or x_t.shape[1] != 1:
        raise ValueError(f"{owner}.step: x_t must be (B, 1, C), got {jnp.shape(x_t)}")
    check_input(owner, x_t, width, "x_t")
    if not isinstance(cache, dict) or set(cache) != set(keys):
        got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise ValueError(
            f"cache: expected a dict with keys {sorted(keys)} (from init_cache or prefill), "
            f"got {got}"
        )
    if batch_key is not None:
        lead = jax.tree_util.tree_leaves(cache[batch_key])[0].shape[0]
        if lead != x_t.shape[0]:
            raise ValueError(f"cache: built for batch {lead}, x_t has batch {x_t.shape[0]}")


def check_log_decay(name: str, log_alpha) -> None:
    """ValueError if a concrete log_alpha has an entry > 0 (or NaN): a_t = exp(·) must be ≤ 1."""
    if log_alpha is None or isinstance(log_alpha, jax.core.Tracer):
        return
    arr = np.asarray(log_alpha, np.float64)
    if np.isnan(arr).any() or (arr > 0).any():
        raise ValueError(f"{name}: expected log-decays <= 0 (a = exp(log_alpha) <= 1), got max "
                         f"{np.max(arr)}")
