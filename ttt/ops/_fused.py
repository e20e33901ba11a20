"""The dual form of a one-layer learner with a hand-written backward (TTT-Linear's fast path).

For f(x) = x W + β (optionally inside the LN residual x + LN(·)γ + δ), per head and mini-batch t
with keys K_t, queries Q_t (b, d), targets T_t (V_t, or V_t − K_t under the LN residual), the
causal b×b matrix A_t = η_t ⊙ (tril(Q_t K_tᵀ) + 1_bias) and the carry row e_t = η_t[b−1]:
    Zk_t = K_t W_t + β_t,     G_t = ∂l/∂Zk_t   (per-token pre-activation gradients)
    W_{t+1} = W_t − K_tᵀ (e_t ⊙ G_t),   β_{t+1} = β_t − e_tᵀ G_t
    Zq_t = Q_t W_t + β_t − A_t G_t       (the answers before the learner's post)
Only the first two lines are sequential. The forward scan carries (W, β), stacks W_t, β_t, G_t,
and every query-side product runs afterwards as one batched matmul over all mini-batches.

The backward is a reverse scan over the same chain (Ŵ, β̂ = cotangents of the carried state):
    u_t = K_t Ŵ_{t+1} + β̂_{t+1},   Ĝ_t = −A_tᵀ Ẑq_t − e_t ⊙ u_t,   ê_t = −rowsum(G_t ⊙ u_t)
    Ẑk_t = (∂G_t/∂Zk_t)ᵀ Ĝ_t        (jax.vjp of the elementwise per-token gradient, closed form)
    Ŵ_t = Ŵ_{t+1} + K_tᵀ Ẑk_t + Q_tᵀ Ẑq_t,   β̂_t = β̂_{t+1} + Σ Ẑk_t + Σ Ẑq_t
and again everything that does not feed the chain (Ẑk → K̂ through W_t, Ẑq → Q̂, Â_t, the
update's K̂ = −(e ⊙ G) Ŵᵀ) runs batched outside the loop. Autodiff of the generic dual form
transposes the whole scan step instead: several times the work inside the sequential loop.

remat_every = n > 0 keeps only the state at the start of every group of n mini-batches for the
backward, which re-runs the group's forward scan (memory ∝ N/n states instead of N/b).
Held equal to the generic dual form (and through it to the primal form) by tests/test_ttt_ops.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttt.ops._scan import num_minibatches


class Config(NamedTuple):
    """Static choices of the fused loop: LN-residual eps (None: plain l2), bias, remat group."""

    eps: float | None
    bias: bool
    remat_every: int


def token_gradients(Zk, T, scale, bias, eps):
    """G = ∂/∂Zk of ½‖post(Zk) − target‖² per row; Zk, T (b, d); scale, bias (d,) LN params.

    eps None: plain l2, G = Zk − T. Otherwise LN(Zk)·scale + bias is fitted to T (= v − k) and the
    LayerNorm backward is written out: ρ (g − mean(g) − x̂ mean(g x̂)), g = (x̂·scale + bias − T)·scale.
    """
    if eps is None:
        return Zk - T
    mu = jnp.mean(Zk, axis=-1, keepdims=True)  # (b, 1)
    var = jnp.maximum(jnp.mean(Zk * Zk, axis=-1, keepdims=True) - mu * mu, 0.0)
    rho = jax.lax.rsqrt(var + eps)  # (b, 1)
    xhat = (Zk - mu) * rho  # (b, d)
    g = (xhat * scale + bias - T) * scale  # (b, d)
    return rho * (
        g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    )


def _chain(cfg, W, beta, K, T, e, scale, bias):
    """Forward scan over mini-batches (leading axis of K, T, e): final state and W_t, β_t, G_t."""

    def step(carry, x):
        W, beta = carry
        K_t, T_t, e_t = x  # (b, d_in), (b, d_out), (b,)
        Zk = K_t @ W + beta  # (b, d_in) @ (d_in, d_out) -> (b, d_out)
        G = token_gradients(Zk, T_t, scale, bias, cfg.eps)  # (b, d_out)
        eG = e_t[:, None] * G
        W_next = W - K_t.T @ eG  # (d_in, b) @ (b, d_out) -> (d_in, d_out)
        beta_next = beta - jnp.sum(eG, axis=0) if cfg.bias else beta
        return (W_next, beta_next), (W, beta, G)

    return jax.lax.scan(step, (W, beta), (K, T, e))


def _answers(Q, A, Ws, betas, Gs):
    """Zq_t = Q_t W_t + β_t − A_t G_t for all mini-batches at once: (n, b, d_out)."""
    # (n, b, d_in) @ (n, d_in, d_out) and (n, b, b) @ (n, b, d_out) -> (n, b, d_out)
    return (jnp.einsum("nbi,nio->nbo", Q, Ws) + betas[:, None, :]
            - jnp.einsum("nij,njo->nio", A, Gs))


def _group_backward(cfg, chain, xs, dZq, dW, dbeta, scale, bias):
    """Cotangents of one group of mini-batches, given its W_t, β_t, G_t and the state's cotangent.

    chain: (Ws, betas, Gs) of the group; xs: (K, Q, T, A, e); dZq (n, b, d_out) the answers'
    cotangent; dW, dbeta: cotangent of the state after the group. Returns the cotangent of the
    state before it and of every input.
    """
    K, Q, T, A, e = xs
    Ws, betas, Gs = chain
    Zk = jnp.einsum("nbi,nio->nbo", K, Ws) + betas[:, None, :]  # (n, b, d_out)
    dGq = -jnp.einsum("nij,nio->njo", A, dZq)  # −A_tᵀ Ẑq_t: (n, b, d_out)
    dA = -jnp.einsum("nio,njo->nij", dZq, Gs)  # −Ẑq_t G_tᵀ: (n, b, b)
    grad_fn = functools.partial(token_gradients, eps=cfg.eps)

    def step(carry, x):
        dW, dbeta = carry  # cotangent of W_{t+1}, β_{t+1}
        K_t, Q_t, Zk_t, T_t, e_t, G_t, dGq_t, dZq_t = x
        u = K_t @ dW  # (b, d_in) @ (d_in, d_out) -> (b, d_out)
        if cfg.bias:
            u = u + dbeta
        dG = dGq_t - e_t[:, None] * u
        de = -jnp.sum(G_t * u, axis=-1)  # (b,)
        _, pullback = jax.vjp(grad_fn, Zk_t, T_t, scale, bias)
        dZk, dT, dscale, dbias = pullback(dG)
        # Ŵ_t = Ŵ_{t+1} + K_tᵀ Ẑk_t + Q_tᵀ Ẑq_t as one (d_in, 2b) @ (2b, d_out) matmul
        kq = jnp.concatenate([K_t, Q_t], axis=0)
        dz = jnp.concatenate([dZk, dZq_t], axis=0)
        dW_prev = dW + kq.T @ dz
        dbeta_prev = dbeta + jnp.sum(dz, axis=0) if cfg.bias else dbeta
        return (dW_prev, dbeta_prev), (dZk, dT, de, dscale, dbias, dW)

    (dW0, dbeta0), (dZk, dT, de, dscale, dbias, dW_next) = jax.lax.scan(
        step, (dW, dbeta), (K, Q, Zk, T, e, Gs, dGq, dZq), reverse=True
    )
    # K enters Zk_t = K_t W_t and the update −K_tᵀ (e_t ⊙ G_t); Q enters Q_t W_t and (outside) A_t
    dK = (jnp.einsum("nbo,nio->nbi", dZk, Ws)
          - jnp.einsum("nbo,nio->nbi", e[:, :, None] * Gs, dW_next))  # (n, b, d_in)
    dQ = jnp.einsum("nbo,nio->nbi", dZq, Ws)  # (n, b, d_in)
    grads = (dK, dQ, dT, dA, de, jnp.sum(dscale, 0), jnp.sum(dbias, 0))
    return (dW0, dbeta0), grads


def _grouped(cfg, x):
    """(M, ...) -> (G, n, ...) with n = remat_every (zero-padded), or (1, M, ...) without remat."""
    m = x.shape[0]
    n = cfg.remat_every if cfg.remat_every > 0 else m
    groups = num_minibatches(m, n)
    x = jnp.pad(x, [(0, groups * n - m)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(groups, n, *x.shape[1:])


def _ungrouped(x, m):
    return x.reshape(-1, *x.shape[2:])[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_dual(cfg, W, beta, K, Q, T, A, e, scale, bias):
    """Per head: answers Zq (M, b, d_out) and final (W, β) of the one-layer chain (module doc).

    W (d_in, d_out); beta (d_out,) (zeros and untouched when not cfg.bias); K, Q (M, b, d_in);
    T (M, b, d_out); A (M, b, b); e (M, b); scale, bias (d_out,) LN params (unused if eps None).
    """
    (W_N, beta_N), (Ws, betas, Gs) = _chain(cfg, W, beta, K, T, e, scale, bias)
    return _answers(Q, A, Ws, betas, Gs), W_N, beta_N


def _fused_fwd(cfg, W, beta, K, Q, T, A, e, scale, bias):
    m = K.shape[0]
    if cfg.remat_every <= 0:
        (W_N, beta_N), chain = _chain(cfg, W, beta, K, T, e, scale, bias)
        Zq = _answers(Q, A, *chain)
        saved = chain
    else:
        # run group by group, keeping only each group's starting state for the backward
        def group(carry, xg):
            Kg, Qg, Tg, Ag, eg = xg
            carry_out, chain = _chain(cfg, *carry, Kg, Tg, eg, scale, bias)
            return carry_out, (_answers(Qg, Ag, *chain), carry)

        xs = tuple(_grouped(cfg, x) for x in (K, Q, T, A, e))
        (W_N, beta_N), (Zq, saved) = jax.lax.scan(group, (W, beta), xs)
        Zq = _ungrouped(Zq, m)
    return (Zq, W_N, beta_N), (saved, W, beta, K, Q, T, A, e, scale, bias)


def _fused_bwd(cfg, res, cts):
    saved, W, beta, K, Q, T, A, e, scale, bias = res
    dZq, dW_N, dbeta_N = cts
    m = K.shape[0]
    if cfg.remat_every <= 0:
        (dW0, dbeta0), grads = _group_backward(
            cfg, saved, (K, Q, T, A, e), dZq, dW_N, dbeta_N, scale, bias
        )
    else:
        def group(carry, xg):
            (Wg, beta_g), Kg, Qg, Tg, Ag, eg, dZq_g = xg
            _, chain = _chain(cfg, Wg, beta_g, Kg, Tg, eg, scale, bias)
            return _group_backward(cfg, chain, (Kg, Qg, Tg, Ag, eg), dZq_g, *carry, scale, bias)

        xs = (saved, *(_grouped(cfg, x) for x in (K, Q, T, A, e, dZq)))
        (dW0, dbeta0), grads = jax.lax.scan(group, (dW_N, dbeta_N), xs, reverse=True)
        grads = (*(_ungrouped(g, m) for g in grads[:5]),
                 jnp.sum(grads[5], 0), jnp.sum(grads[6], 0))
    dK, dQ, dT, dA, de, dscale, dbias = grads
    if not cfg.bias:
        dbeta0 = jnp.zeros_like(beta)
    return dW0, dbeta0, dK, dQ, dT, dA, de, dscale, dbias


fused_dual.defvjp(_fused_fwd, _fused_bwd)
