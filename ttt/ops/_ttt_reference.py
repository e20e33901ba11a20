"""`ttt_naive`: causal mini-batch TTT token by token, the reference of the fast forms (tests only).

It materialises every W_i from the definition (docs/design.md §4.1, §4.11) with a Python loop over
tokens, vectorised over (B, H), and shares no layout code with `ttt.ops.ttt`: η is read straight
from the contract's layouts, and a forget gate's Γ_i/Γ_j are products of a_s, not differences of
cumulative log sums.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt.ops._ttt_args import check_log_alpha, check_sequence, head_shapes
from ttt.ops.learners import reconstruction_loss


@functools.partial(jax.jit, static_argnums=0)
def _naive_grads(learner, W, fixed, k_blk, v_blk):
    """g_j = ∇_W l(W; k_j, v_j) of a block: k_blk (B, H, r, d_in) -> leaves (B, H, r, ...)."""
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    per_head = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))
    return jax.vmap(jax.vmap(per_head))(W, fixed, k_blk, v_blk)


@functools.partial(jax.jit, static_argnums=0)
def _naive_decayed_grads(learner, W, fixed, k_blk, v_blk, gamma):
    """g_j = ∇ l(Γ_j W; k_j, v_j) of a block: gamma (B, H, r) -> leaves (B, H, r, ...)."""
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    scaled = lambda W, s: jax.tree_util.tree_map(lambda w: s.astype(w.dtype) * w, W)  # Γ_j W
    one = lambda W, f, kj, vj, s: jax.grad(loss)(scaled(W, s), f, kj, vj)
    per_head = jax.vmap(one, in_axes=(None, None, 0, 0, 0))
    return jax.vmap(jax.vmap(per_head))(W, fixed, k_blk, v_blk, gamma)


@functools.partial(jax.jit, static_argnums=0)
def _naive_answer(learner, W, g, lr, q_t, fixed, gamma=None):
    """W_t = W − Σ_j lr_j g_j (lr (B, H, r), zero for future j); z_t = f(q_t; W_t) (B, H, d_out).
    gamma (B, H): W is first decayed to Γ_t W (a forget gate), else None."""
    if gamma is not None:
        W = jax.tree_util.tree_map(lambda w: jnp.einsum("bh,bh...->bh...", gamma, w), W)
    W_t = jax.tree_util.tree_map(
        # (B, H, r) · (B, H, r, ...) -> (B, H, ...)
        lambda w, g_l: (w - jnp.einsum("bhj,bhj...->bh...", lr, g_l)).astype(w.dtype), W, g
    )
    return W_t, jax.vmap(jax.vmap(learner.apply))(W_t, q_t, fixed)


def ttt_naive(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, log_alpha=None):
    """Token-by-token reference (tests only): materialises every W_i from the definition.

    Same shapes and results as ttt_primal; a Python loop over tokens, vectorised over (B, H) only.
    Reads η straight from the contract's layouts (it shares no layout code with the fast forms).
    With a gate log_alpha (B, H, N) the decays Γ_i/Γ_j are products of a_s = exp(log_alpha_s)
    over j < s ≤ i (not the fast forms' differences of cumulative sums).
    """
    check_sequence(q, k, v, eta, mini_batch)
    check_log_alpha(log_alpha, q)
    per_sequence = head_shapes(learner, W0, q, v, fixed)
    B, H, N, _ = q.shape
    b = mini_batch
    to_bh = lambda w: jnp.broadcast_to(w, (B, *w.shape))  # (H, ...) -> (B, H, ...)
    W = W0 if per_sequence else jax.tree_util.tree_map(to_bh, W0)
    fix = jax.tree_util.tree_map(to_bh, fixed)
    zs = []
    for start in range(0, N, b):
        r = min(b, N - start)  # tokens in this mini-batch
        blk = lambda x: x[:, :, start : start + r]
        if log_alpha is None:
            g = _naive_grads(learner, W, fix, blk(k), blk(v))
        else:
            a = jnp.exp(blk(log_alpha))  # (B, H, r)
            s = jnp.arange(r)
            # Γ_i = Π_{s≤i} a_s: (B, H, r)
            gamma = jnp.prod(jnp.where(s[None, :] <= s[:, None], a[..., None, :], 1.0), axis=-1)
            g = _naive_decayed_grads(learner, W, fix, blk(k), blk(v), gamma)
        for i in range(r):
            t = start + i
            row = eta[:, :, start : start + r] if eta.ndim == 3 else eta[:, :, t, :r]  # (B, H, r)
            lr = jnp.where(jnp.arange(r) <= i, row, 0.0)  # only j <= i: causal incl. diagonal
            if log_alpha is None:
                W_t, z_t = _naive_answer(learner, W, g, lr, q[:, :, t], fix)
            else:
                # Γ_i/Γ_j = Π_{j<s≤i} a_s for every j ≤ i: (B, H, r)
                inside = (s[None, :] > s[:, None]) & (s[None, :] <= i)  # (j, s)
                ratio = jnp.prod(jnp.where(inside, a[..., None, :], 1.0), axis=-1)
                W_t, z_t = _naive_answer(learner, W, g, lr * ratio, q[:, :, t], fix,
                                         gamma[..., i])
            zs.append(z_t)
        W = W_t  # the last token of the mini-batch carries the state
    return jnp.stack(zs, axis=2), W  # (B, H, N, d_out)
