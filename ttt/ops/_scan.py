"""Mini-batch layout shared by the causal TTT loops: padding, the masked η matrix, the remat scan.

A sequence of N tokens is cut into M = ceil(N / b) mini-batches. A final partial mini-batch of r
tokens is padded with b − r dummy tokens whose learning rates are zero, so they add nothing to any
state, and their answers are sliced away: the padded loop is exact, not an approximation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GPU_UNROLL = 8  # mini-batch steps per loop iteration on a GPU (measured: docs/benchmarks.md)


def default_unroll(backend: str | None = None) -> int:
    """The scan `unroll` a layer uses unless told otherwise: GPU_UNROLL on a GPU, else 1.

    A GPU pays a fixed cost per iteration of a compiled loop that the per-mini-batch matmuls
    (b × d by d × d per head) are too small to hide; the CPU gains nothing and compiles longer.
    """
    return GPU_UNROLL if (backend or jax.default_backend()) == "gpu" else 1


def num_minibatches(n: int, b: int) -> int:
    """ceil(n / b)."""
    return -(-n // b)


def to_minibatches(x, b: int):
    """(..., N, d) -> (..., M, b, d), zero-padding the tokens of a final partial mini-batch."""
    n = x.shape[-2]
    pad = num_minibatches(n, b) * b - n
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])  # (..., M*b, d)
    return x.reshape(*x.shape[:-2], -1, b, x.shape[-1])  # (..., M, b, d)


def from_minibatches(z, n: int):
    """(..., M, b, d) -> (..., N, d): undo `to_minibatches`, dropping the padded answers."""
    z = z.reshape(*z.shape[:-3], -1, z.shape[-1])  # (..., M*b, d)
    return z[..., :n, :]


def eta_matrix(eta, b: int):
    """The causal b×b learning-rate matrix of every mini-batch, masked: (B, H, M, b, b).

    eta (B, H, N): eta_ij = eta[m*b + j];  eta (B, H, N, b): eta_ij = eta[m*b + i, j].
    Entries j > i (future tokens) and columns of padded tokens are zero. Rows of padded tokens
    repeat the last real row, so row b − 1 is always the row that carries the state forward
    (the contract's "last token's row", also for a final partial mini-batch).
    """
    n = eta.shape[2]
    m = num_minibatches(n, b)
    pad = m * b - n
    if eta.ndim == 3:
        eta = jnp.pad(eta, [(0, 0), (0, 0), (0, pad)])  # (B, H, M*b)
        rows = jnp.broadcast_to(
            eta.reshape(*eta.shape[:2], m, 1, b), (*eta.shape[:2], m, b, b)
        )  # (B, H, M, b, b): every row i holds eta[m*b + j]
    else:
        # edge padding copies the last real row into the padded rows (see docstring)
        eta = jnp.pad(eta, [(0, 0), (0, 0), (0, pad), (0, 0)], mode="edge")  # (B, H, M*b, b)
        rows = eta.reshape(*eta.shape[:2], m, b, b)  # (B, H, M, b, b)
    valid = (jnp.arange(m * b) < n).reshape(m, 1, b)  # (M, 1, b): column j is a real token
    causal = jnp.tril(jnp.ones((b, b), dtype=bool))  # (b, b): j <= i, diagonal included
    return jnp.where(valid & causal, rows, jnp.zeros((), rows.dtype))


def scan_groups(group_step, carry, xs, size: int):
    """Scan `group_step(carry, xs_g) -> (carry, ys_g)` over groups of `size` elements of the
    leading axis of `xs`, each group under `jax.checkpoint` (the one remat mechanism of a layer).

    The backward pass stores the carry at each group boundary and recomputes one group at a time,
    so training memory holds one group's intermediates instead of the whole sequence's. The leading
    axis (length n) is padded with zeros to whole groups; padded elements come after every real
    one, so they change no real output, and the outputs are cut back to n. The carry returned is
    the one after the padded elements: callers that return it need a `group_step` that leaves the
    carry unchanged on all-zero inputs (true of every TTT step, where zero η means no update).
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    groups = num_minibatches(n, size)
    pad = groups * size - n

    def group_up(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))  # (G·size, ...)
        return x.reshape(groups, size, *x.shape[1:])  # (G, size, ...)

    carry, ys = jax.lax.scan(jax.checkpoint(group_step), carry,
                             jax.tree_util.tree_map(group_up, xs))
    ys = jax.tree_util.tree_map(lambda y: y.reshape(groups * size, *y.shape[2:])[:n], ys)
    return carry, ys


def scan_minibatches(step, carry, xs, remat_every: int = 0, unroll: int = 1):
    """lax.scan of `step(carry, x_m) -> (carry, y_m)` over the leading (mini-batch) axis of `xs`.

    unroll: mini-batch steps per loop iteration (lax.scan's `unroll`; results are unchanged). On a
    GPU each iteration of a compiled loop costs a fixed launch/synchronisation overhead that the
    tiny per-mini-batch matmuls do not hide, so unrolling a few steps pays there.

    remat_every = n > 0 runs the mini-batches in checkpointed groups of n (`scan_groups`), so the
    backward pass stores one state per group instead of one per mini-batch.
    """
    if remat_every <= 0:
        return jax.lax.scan(step, carry, xs, unroll=unroll)

    def group_step(c, xg):
        return jax.lax.scan(step, c, xg, unroll=min(unroll, remat_every))

    return scan_groups(group_step, carry, xs, remat_every)
