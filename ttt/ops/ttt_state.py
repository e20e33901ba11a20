"""The causal TTT state machine (TTT-LM): training forward, prefill, and the one-token step over an
explicit state (docs/design.md §4.6–4.8).

The learning rates of TTT-LM factorise, η_ij = c_i · a_j: a per-token gate a_j (`lr_gate`) times a
coefficient c_i of the position i inside the mini-batch (`lr_coefficients`). That is what lets a
mini-batch be read one token at a time: every gradient of a mini-batch is taken at the state W it
started from, so the state only needs W and the running sum G = Σ_{j so far} a_j g_j:

    G ← G + a_t ∇_W l(W; k_t, v_t),     z_t = f(q_t; W − c_t G),
    at the mini-batch's last token:     W ← W − c_t G,  G ← 0.

- `forward`: the training path, every token at once in the dual (or primal) form -> (z, W_N).
- `prefill`: whole mini-batches through `forward`, the rest token by token -> (z, TTTState).
- `step`: one token -> (z_t, TTTState). prefill + steps == forward (tests/test_ttt_state.py).
- `inner_loss_stats`: the reconstruction errors before/after each token's update (diagnostics).

A forget gate (`log_alpha`, docs/design.md §4.11) decays the state before every token: `step`
multiplies W and G by α_t = exp(log_alpha_t), so W holds the mini-batch's start state decayed to
the last token read (Γ_t W) and G the decayed sum; at a mini-batch boundary W is the carried state,
as without a gate, and the state keeps its fields (W, G, pos).

Everything here is pure `jax.numpy` on per-head arrays (B, H, N, d); a Flax layer computes the
projections and calls one of these (`ttt.layers.ttt_layer`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ttt.ops import checks
from ttt.ops._scan import num_minibatches
from ttt.ops._ttt_args import head_shapes
from ttt.ops.ttt import ttt, ttt_decode_step


class TTTState(NamedTuple):
    """Decode state of causal TTT, a size independent of the context length.

    W: inner weights at the start of the current mini-batch, leaves (B, H, ...).
    G: Σ_j a_j ∇_W l(W; k_j, v_j) over the tokens of the current mini-batch read so far (same
       shapes as W; zero at a mini-batch boundary).
    pos: int32 scalar, tokens read so far; the position inside the mini-batch is pos mod b.
    """

    W: Any
    G: Any
    pos: jax.Array


def init_state(W0, batch: int) -> TTTState:
    """The state before the first token: W0 (leading H) copied per sequence, G = 0, pos = 0."""
    W = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch, *jnp.shape(w))), W0)
    return TTTState(W, jax.tree_util.tree_map(jnp.zeros_like, W), jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- learning rates


def lr_gate(x, kernel, bias, dtype=None):
    """a_j = sigmoid(x_j · k_h + c_h): x (B, N, C), kernel (H, C), bias (H,) -> (B, H, N).

    The logits are taken in x's dtype (the layer's compute dtype), the sigmoid in `dtype`
    (default: at least float32, the inner loop's precision).
    """
    dtype = dtype or jnp.promote_types(x.dtype, jnp.float32)
    logits = jnp.einsum("bnc,hc->bhn", x, kernel.astype(x.dtype))  # (B, H, N)
    return jax.nn.sigmoid(logits.astype(dtype) + bias.astype(dtype)[None, :, None])


def forget_gate(x, kernel, A_log, dt_bias, dtype=None):
    """log a_t = −exp(A_log_h) · softplus(x_t · k_h + dt_bias_h) ≤ 0 (Gated DeltaNet's decay):
    x (B, N, C), kernel (C, H), A_log and dt_bias (H,) -> (B, H, N).

    The logits are taken in x's dtype, the rest in `dtype` (default: at least float32).
    """
    dtype = dtype or jnp.promote_types(x.dtype, jnp.float32)
    logits = jnp.einsum("bnc,ch->bhn", x, kernel.astype(x.dtype))  # (B, H, N)
    rate = jnp.exp(A_log.astype(dtype))[None, :, None]  # (1, H, 1)
    return -rate * jax.nn.softplus(logits.astype(dtype) + dt_bias.astype(dtype)[None, :, None])


def positions(pos0, n: int, mini_batch: int):
    """Positions inside the mini-batch of tokens pos0 … pos0 + n − 1 (absolute for mini_batch 0).

    With a Python int pos0 (a training step or prefill) the result is a numpy array, so the RoPE
    tables and η coefficients built from it are constants of the compiled program rather than
    per-element recomputations; a traced pos0 (decoding) gives a traced array.
    """
    t = pos0 + np.arange(n)  # (n,) absolute positions
    return t % mini_batch if mini_batch > 0 else t


def lr_coefficients(positions, offset, scale):
    """c_i = scale · max(1/(i + 1) + offset_i, 0) for positions i inside the mini-batch.

    positions: (N,) ints in [0, b); offset: (b,) learnable token offsets (init 0);
    scale: base_lr / d (× any warm-up multiplier). Returns (N,) in offset's dtype.
    """
    i = jnp.asarray(positions)
    base = 1.0 / (i.astype(offset.dtype) + 1.0) + offset[i]
    return scale * jnp.maximum(base, 0.0)


def _blocks(a, c, b: int):
    """(B, H, M, b_i, b_j) blocks c_{m·b+i} · a_{m·b+j}, zero in columns past N."""
    B, H, N = a.shape
    M = num_minibatches(N, b)
    ap = jnp.pad(a, ((0, 0), (0, 0), (0, M * b - N))).reshape(B, H, M, b)  # (B, H, M, b_j)
    cp = jnp.pad(c, (0, M * b - N)).reshape(M, b)  # (M, b_i)
    # an einsum, not a broadcast product: its gradient is then a dot, not a reduce of a product
    return jnp.einsum("mi,bhmj->bhmij", cp, ap)


def eta_rows(a, c, b: int):
    """The b×b learning rates in the rows layout of `ttt.ops.ttt`: a (B, H, N), c (N,) -> (B, H,
    N, b), where token t = m·b + i holds c_t · a_{m·b + j} in column j (0 past N)."""
    B, H, N = a.shape
    return _blocks(a, c, b).reshape(B, H, -1, b)[:, :, :N]


# ----------------------------------------------------------------------------- the three paths


def forward(learner, W0, q, k, v, a, c, *, mini_batch: int, fixed=None, form="auto",
            remat_every=0, unroll=1, kernel="auto", log_alpha=None):
    """Training forward: z (B, H, N, d_out) and the state W_N after the last token.

    q, k (B, H, N, d_in); v (B, H, N, d_out); a (B, H, N) gates; c (N,) per-token coefficients
    (c at each token's position in its mini-batch); W0 leading H or (B, H); fixed leading H.
    mini_batch: b, or 0 for one mini-batch spanning the sequence. form, remat_every, unroll,
    kernel, log_alpha (B, H, N) (a forget gate, or None): as `ttt.ops.ttt.ttt`.
    """
    b = mini_batch or q.shape[2]
    gate = {} if log_alpha is None else {"log_alpha": log_alpha}
    return ttt(learner, W0, q, k, v, eta_rows(a, c, b), mini_batch=b, fixed=fixed,
               remat_every=remat_every, unroll=unroll, form=form, kernel=kernel, **gate)


def prefill(learner, W0, q, k, v, a, c, *, mini_batch: int, fixed=None, form="auto",
            remat_every=0, unroll=1, kernel="auto", log_alpha=None):
    """Read a prompt from the start: z (B, H, N, d_out) and the TTTState after its N tokens.

    Whole mini-batches run through `forward`; the remaining N mod b tokens (all N when
    mini_batch = 0) through `step`, which leaves their mini-batch open in the state.
    Arguments as `forward`.
    """
    B, _, N, _ = q.shape
    n_full = (N // mini_batch) * mini_batch if mini_batch > 0 else 0
    zs = []
    if n_full:
        head = lambda x: x[..., :n_full, :] if x.ndim == 4 else x[..., :n_full]
        gate = {} if log_alpha is None else {"log_alpha": head(log_alpha)}
        z, W = forward(learner, W0, head(q), head(k), head(v), head(a), c[:n_full],
                       mini_batch=mini_batch, fixed=fixed, form=form, remat_every=remat_every,
                       unroll=unroll, kernel=kernel, **gate)
        zs.append(z)
        state = TTTState(W, jax.tree_util.tree_map(jnp.zeros_like, W), jnp.asarray(n_full,
                                                                                  jnp.int32))
    else:
        per_sequence = head_shapes(learner, W0, q, v, fixed)
        state = TTTState(W0, jax.tree_util.tree_map(jnp.zeros_like, W0), jnp.zeros((),
                                                                                jnp.int32))
        if not per_sequence:
            state = init_state(W0, B)
    if N > n_full:
        rest = lambda x: jnp.moveaxis(x[:, :, n_full:], 2, 0)  # (r, B, H, ...)

        def one(state, xs):
            (q_t, k_t, v_t, a_t, *la_t), c_t = xs
            z_t, state = step(learner, state, q_t, k_t, v_t, a_t, c_t, mini_batch=mini_batch,
                              fixed=fixed, log_alpha_t=la_t[0] if la_t else None)
            return state, z_t

        seq = (rest(q), rest(k), rest(v), rest(a))
        if log_alpha is not None:
            seq = (*seq, rest(log_alpha))
        state, z_r = jax.lax.scan(one, state, (seq, c[n_full:]))
        zs.append(jnp.moveaxis(z_r, 0, 2))  # (B, H, r, d_out)
    return (jnp.concatenate(zs, axis=2) if len(zs) > 1 else zs[0]), state


def step(learner, state: TTTState, q_t, k_t, v_t, a_t, c_t, *, mini_batch: int, fixed=None,
         log_alpha_t=None):
    """One token: (z_t (B, H, d_out), the next TTTState).

    q_t, k_t (B, H, d_in); v_t (B, H, d_out); a_t (B, H); c_t the coefficient of this token's
    position (a scalar or (B, H)). mini_batch = 0 never closes the mini-batch. log_alpha_t (B, H):
    a forget gate's log-decay of this token (W and G decay by its exp first), or None.
    """
    B, H = q_t.shape[:2]
    checks.check_leading("state.G", state.G, (B, H), "(B, H)")
    c_bh = jnp.broadcast_to(jnp.asarray(c_t, a_t.dtype), (B, H))
    if log_alpha_t is None:
        z_t, G = ttt_decode_step(learner, state.W, state.G, q_t, k_t, v_t, a_t, c_bh,
                                 fixed=fixed)
    else:
        z_t, G, W_dec = ttt_decode_step(learner, state.W, state.G, q_t, k_t, v_t, a_t, c_bh,
                                        fixed=fixed, log_alpha_t=log_alpha_t)
        state = state._replace(W=W_dec)
    if mini_batch > 0:
        close = state.pos % mini_batch == mini_batch - 1

        def new_w(w, g):  # W ← W − c_t G at the mini-batch's last token
            c = c_bh.reshape(c_bh.shape + (1,) * (w.ndim - 2)).astype(w.dtype)
            return jnp.where(close, w - c * g, w)

        W = jax.tree_util.tree_map(new_w, state.W, G)
        G = jax.tree_util.tree_map(lambda g: jnp.where(close, jnp.zeros_like(g), g), G)
    else:
        W = state.W
    return z_t, TTTState(W, G, state.pos + 1)


# ----------------------------------------------------------------------------- diagnostics


def inner_loss_stats(learner, W0, k, v, a, c, *, mini_batch: int, fixed=None, form="auto",
                     log_alpha=None):
    """Mean squared reconstruction errors of every token (diagnostics; no gradient flows).

    k (B, H, N, d); v (B, H, N, d_out); a (B, H, N); c (N,); W0, fixed leading H.
    One inner pass over a sequence where every mini-batch is preceded by a copy of its keys with
    zero learning rates: the copies are answered at the mini-batch's starting state ("before"),
    the originals after the causal update including their own gradient ("after"). With a forget
    gate log_alpha (B, H, N) the copies do not decay (log-decay 0), so "before" is still at the
    mini-batch's start state and the originals see exactly their forward's decays.
    Returns {"inner_loss_init", "inner_loss_before", "inner_loss_after"}: float32 scalars, means
    over batch, heads, tokens and features (the "ttt_loss_mse" of the official code).
    """
    sg = jax.lax.stop_gradient
    k, v, a, c, W0, fixed, log_alpha = sg((k, v, a, c, W0, fixed, log_alpha))
    B, H, N, _ = k.shape
    dv = v.shape[-1]
    b = mini_batch or N
    M = num_minibatches(N, b)

    def doubled(x):  # (B, H, N, e) -> (B, H, 2·M·b, e): [copy of mini-batch m, mini-batch m] ...
        x = jnp.pad(x, ((0, 0), (0, 0), (0, M * b - N), (0, 0)))
        x = x.reshape(B, H, M, 1, b, x.shape[-1])  # (B, H, M, 1, b, e)
        return jnp.concatenate([x, x], axis=3).reshape(B, H, 2 * M * b, x.shape[-1])

    rows = _blocks(a, c, b)  # (B, H, M, b_i, b_j)
    zero = jnp.zeros_like(rows)
    top = jnp.concatenate([zero, zero], axis=-1)  # copies: learn nothing, (B, H, M, b, 2b)
    bottom = jnp.concatenate([zero, rows], axis=-1)  # originals: see only originals
    eta2 = jnp.concatenate([top, bottom], axis=3).reshape(B, H, 2 * M * b, 2 * b)
    k2, v2 = doubled(k), doubled(v)
    gate = {}
    if log_alpha is not None:  # copies: no decay; originals: their own
        la2 = doubled(log_alpha[..., None])[..., 0]  # (B, H, 2·M·b)
        copy = (jnp.arange(2 * M * b) // b) % 2 == 0  # (2·M·b,): the copies' positions
        gate = {"log_alpha": jnp.where(copy, jnp.zeros((), la2.dtype), la2)}
    z2, _ = ttt(learner, W0, k2, k2, v2, eta2, mini_batch=2 * b, fixed=fixed, form=form, **gate)
    z2 = z2.reshape(B, H, M, 2, b, dv)  # (B, H, M, copy|original, b, dv)
    before = z2[:, :, :, 0].reshape(B, H, M * b, dv)[:, :, :N]
    after = z2[:, :, :, 1].reshape(B, H, M * b, dv)[:, :, :N]
    per_head = jax.vmap(learner.apply, in_axes=(0, 1, 0 if fixed is not None else None),
                        out_axes=1)
    init = per_head(W0, k, fixed)  # (B, H, N, dv)
    mean_sq = lambda x: jnp.mean(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32))))
    return {
        "inner_loss_init": mean_sq(init - v),
        "inner_loss_before": mean_sq(before - v),
        "inner_loss_after": mean_sq(after - v),
    }


__all__ = ["TTTState", "eta_rows", "forget_gate", "forward", "init_state", "inner_loss_stats",
           "lr_coefficients", "lr_gate", "positions", "prefill", "step"]
