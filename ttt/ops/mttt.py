"""Multi-step non-causal TTT (MTTT, Sun et al. 2023), docs/design.md §5 and §9.

Per sequence and head the hidden state is the parameter pytree W of an inner learner f(·; W).
Starting from W_0 the inner loop takes T gradient steps on a reconstruction loss over the tokens,

    L(W; S) = 1 / (2 |S| loss_norm) Σ_{i∈S} ‖r_i − v_i‖²,   r_i = decode(f(k_i; W)) or f(k_i; W),
    W_t = W_{t−1} − η_t ∇_W L(W_{t−1}; S_t),   t = 1..T,

then answers every query with z_j = f(q_j; W_T). S_t is every token ("gd", full-batch) or the t-th
of T chunks of one random permutation per (batch, head) ("sgd").

Notable choices:
- The T steps are one `lax.scan` (the official code hand-unrolls them and caps T at 4). T = 0 is
  allowed and returns f(q; W_0).
- "sgd" chunks have static shape (T, ceil(n/T)) with a mask, so unequal chunks (n not divisible by
  T) stay inside the same scan; chunk sizes differ by at most one and every token is used once.
- The full-set loss at W_0..W_T is returned as a diagnostic (the paper's inner-loss curves).
- Everything is differentiable w.r.t. q, k, v, W_0, the learning rates and the decoder parameters
  (the outer loop learns through the inner loop: second-order terms included).
- `inner_opt`: the steps may run through an inner optimizer (`ttt.ops.inner_opt`, unit learning
  rate): (u_t, s_t) = tx.update(∇L, s_{t−1}, W_{t−1}), W_t = W_{t−1} + η_t u_t; None: GD as above.
- `loss="dot"`: LaCT's L = −1 / (|S| loss_norm) Σ_{i∈S} r_i·v_i instead of the squared error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ttt.ops import checks, inner_opt
from ttt.ops.learners import LOSSES

_MODES = ("gd", "sgd")


def sgd_chunks(key, n: int, T: int):
    """Split one random permutation of n tokens into T chunks for "sgd" MTTT.

    key: a PRNG key; n, T: static ints (T >= 1) -> (idx (T, c) int32, mask (T, c) bool) with
    c = ceil(n / T). Row t lists the tokens of chunk t; `mask[t, j]` says whether slot j is used
    (padding slots hold index 0 and are masked). With n = a T + r, the first r chunks have a + 1
    tokens and the rest a, so sizes differ by at most one and every token appears exactly once.
    If T > n the last T − n chunks are empty.
    """
    if T < 1:
        raise ValueError(f"T: expected at least one chunk, got {T}")
    if n < 1:
        raise ValueError(f"n: expected at least one token, got {n}")
    c = -(-n // T)
    a, r = divmod(n, T)
    sizes = a + (np.arange(T) < r)  # (T,)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (T,)
    slot = np.arange(c)  # (c,)
    mask = slot[None, :] < sizes[:, None]  # (T, c)
    positions = np.where(mask, starts[:, None] + slot[None, :], 0)  # (T, c) into the permutation
    perm = jax.random.permutation(key, n)  # (n,)
    idx = jnp.where(mask, perm[positions], 0).astype(jnp.int32)  # (T, c)
    return idx, jnp.asarray(mask)


def _loss_fn(learner, decode, loss_norm, kind="mse"):
    """L(W; S) for one head: (W, fixed, decode_params_h, k_S (m, d_in), v_S (m, d_v), w (m,))."""

    def loss(W, fixed, dparams, k_S, v_S, w):
        y = learner.apply(W, k_S, fixed)  # (m, d_out)
        r = y if decode is None else decode(y, dparams)  # (m, d_v)
        if kind == "dot":
            err = -jnp.sum(r * v_S, axis=-1)  # (m,)
        else:
            err = 0.5 * jnp.sum((r - v_S) ** 2, axis=-1)  # (m,)
        # An empty chunk (T > n) has no tokens: its loss and gradient are zero, not 0/0.
        count = jnp.maximum(jnp.sum(w), 1.0)
        return jnp.sum(w * err) / (count * loss_norm)

    return loss


def _mttt_head(learner, decode, loss_norm, mode, W0, fixed, dparams, q, k, v, lrs, idx, mask,
               tx=None, kind="mse"):
    """MTTT for one (batch, head): q, k (N, d_in); v (N, d_v); lrs (T,); idx, mask (T, c)."""
    loss = _loss_fn(learner, decode, loss_norm, kind)
    full = jnp.ones(k.shape[:1], dtype=k.dtype)  # (N,) every token, weight 1

    def step(carry, xs):
        W, s = carry
        if mode == "gd":
            eta = xs
            L_full, g = jax.value_and_grad(loss)(W, fixed, dparams, k, v, full)
        else:
            eta, idx_t, mask_t = xs  # (), (c,), (c,)
            L_full = loss(W, fixed, dparams, k, v, full)
            g = jax.grad(loss)(W, fixed, dparams, k[idx_t], v[idx_t], mask_t.astype(k.dtype))
        if tx is None:
            W = jax.tree_util.tree_map(lambda w, gw: (w - eta * gw).astype(w.dtype), W, g)
        else:
            u, s = inner_opt.apply_update(tx, g, s, W)
            W = jax.tree_util.tree_map(lambda w, u_l: (w + eta * u_l).astype(w.dtype), W, u)
        return (W, s), L_full

    xs = lrs if mode == "gd" else (lrs, idx, mask)
    s0 = None if tx is None else tx.init(W0)
    (W_T, _), L_steps = jax.lax.scan(step, (W0, s0), xs)  # L_steps (T,): loss at W_0..W_{T-1}
    L_T = loss(W_T, fixed, dparams, k, v, full)
    losses = jnp.concatenate([L_steps, L_T[None].astype(L_steps.dtype)])  # (T + 1,)
    z = learner.apply(W_T, q, fixed)  # (N, d_out)
    return z, W_T, losses


def _check_args(q, k, v, lrs, fixed, decode, decode_params, mode, key):
    """Shapes, dtypes and options of `mttt`, checked before tracing so errors read in words."""
    checks.check_rank("q", q, 4, "(B, H, N, d_in)")
    B, H, N, d_in = q.shape
    checks.check_shape("k", k, (B, H, N, d_in), "(B, H, N, d_in)", like="q")
    checks.check_rank("v", v, 4, "(B, H, N, d_v)")
    checks.check_shape("v", v, (B, H, N, None), "(B, H, N, d_v)", like="q")
    if N < 1:
        raise ValueError(f"q: expected at least one token (N >= 1), got shape {tuple(q.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v), ("lrs", lrs)):
        checks.check_floating(name, x)
    checks.check_same_dtype(q=q, k=k, v=v)
    checks.check_rank("lrs", lrs, 1, "(T,)")
    checks.check_choice("mode", mode, _MODES)
    if mode == "sgd" and lrs.shape[0] > 0 and key is None:
        raise ValueError('key: a PRNG key is required with mode="sgd"')
    if fixed is not None:
        checks.check_leading("fixed", fixed, (H,), "(H,)")
    if decode_params is not None:
        checks.check_leading("decode_params", decode_params, (H,), "(H,)")
    if decode is None and decode_params is not None:
        raise ValueError("decode_params: given without a decode function; pass decode=...")


def mttt(
    learner,
    W0,
    q,
    k,
    v,
    lrs,
    *,
    fixed=None,
    decode: Callable | None = None,
    decode_params=None,
    mode: str = "gd",
    key=None,
    loss_norm: float = 1.0,
    inner_opt=None,
    loss: str = "mse",
):
    """Multi-step TTT on all tokens of a sequence, then answer every query (docs/design.md §5).

    learner: a `Learner` (init/apply); W0: its parameter pytree with a leading H axis (shared over
      the batch) or leading (B, H) axes (one state per sequence).
    q, k: (B, H, N, d_in); v: (B, H, N, d_v), the reconstruction target (full width C in MTTT).
    lrs: (T,) learning rate η_t of step t; T = 0 gives z = f(q; W0).
    fixed: per-head params the inner loop does not train (leading H), passed to `learner.apply`.
    decode: optional decode(y, decode_params_h) -> r, y (m, d_out) -> r (m, d_v), e.g. MTTT's
      r = LN_h(y G_h + g_bias); decode_params: pytree with leading H.
    mode: "gd" (S_t = all tokens) or "sgd" (one permutation per (batch, head) from `key`, split
      into T chunks by `sgd_chunks`; step t uses chunk t).
    loss_norm: L(W; S) = Σ_{i∈S} ‖r_i − v_i‖² / (2 |S| loss_norm) (MTTT passes dh).
    inner_opt: None (gradient descent) or an optax transform with unit learning rate
      (`ttt.ops.inner_opt.make`): W_t = W_{t−1} + η_t u_t, its state carried across the T steps.
    loss: "mse" (the squared error above) or "dot" (−Σ r_i·v_i / (|S| loss_norm)).

    Returns (z (B, H, N, d_out), W_T (pytree, leading (B, H)), losses (B, H, T + 1)), where
    losses[..., t] is the full-set loss at W_t.
    """
    lrs = jnp.asarray(lrs)
    _check_args(q, k, v, lrs, fixed, decode, decode_params, mode, key)
    checks.check_choice("loss", loss, LOSSES)
    B, H, N, d_in = q.shape
    per_sequence = checks.inner_state_layout(learner, W0, B, H, d_in)
    T = lrs.shape[0]
    if mode == "sgd" and T == 0:
        mode = "gd"  # no steps, nothing to sample

    _check_decode_width(learner, decode, W0, fixed, decode_params, q, v, per_sequence)
    if isinstance(loss_norm, int | float) and not (math.isfinite(loss_norm) and loss_norm > 0):
        raise ValueError(f"loss_norm: expected a positive number, got {loss_norm}")
    keys = None
    if mode == "sgd":
        keys = jax.random.split(key, B * H)
        keys = keys.reshape((B, H) + keys.shape[1:])  # (B, H, ...) one key per (batch, head)
    return _mttt(learner, decode, mode, per_sequence, inner_opt, loss, W0, fixed, decode_params,
                 q, k, v, lrs, keys, loss_norm)  # fmt: skip


# jit so that eager calls reuse one compiled scan instead of retracing it on every call
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _mttt(learner, decode, mode, per_sequence, tx, kind, W0, fixed, dparams, q, k, v, lrs, keys,
          loss_norm):
    """The vmapped loop: per-head `_mttt_head` over H, then over B; see `mttt` for shapes."""
    N, T = q.shape[2], lrs.shape[0]
    idx = mask = None
    if mode == "sgd":
        chunk = lambda kk: sgd_chunks(kk, N, T)
        idx, mask = jax.vmap(jax.vmap(chunk))(keys)  # (B, H, T, c) each

    head = lambda W, f, dp, q_, k_, v_, i_, m_: _mttt_head(
        learner, decode, loss_norm, mode, W, f, dp, q_, k_, v_, lrs, i_, m_, tx, kind
    )
    over_heads = jax.vmap(head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0))
    w_axis = 0 if per_sequence else None
    over_batch = jax.vmap(over_heads, in_axes=(w_axis, None, None, 0, 0, 0, 0, 0))
    return over_batch(W0, fixed, dparams, q, k, v, idx, mask)


def _check_decode_width(learner, decode, W0, fixed, decode_params, q, v, per_sequence):
    """Fail in words if the reconstruction r of one head does not have v's width d_v."""
    take = lambda tree, n: jax.tree_util.tree_map(lambda x: x[(0,) * n], tree)
    W_h = take(W0, 2 if per_sequence else 1)
    f_h = None if fixed is None else take(fixed, 1)
    dp_h = None if decode_params is None else take(decode_params, 1)

    def recon(x):
        y = learner.apply(W_h, x, f_h)
        return y if decode is None else decode(y, dp_h)

    r = jax.eval_shape(recon, jax.ShapeDtypeStruct(q.shape[2:], q.dtype))
    if r.shape != v.shape[2:]:
        what = "decode(f(k; W))" if decode is not None else "f(k; W) (no decode)"
        raise ValueError(
            f"v: expected (B, H, N, d_v) with d_v = {r.shape[-1]}, the width of {what}, "
            f"got {tuple(v.shape)}"
        )
