"""The dual form of a one-layer learner with a hand-written backward (TTT-Linear's fast path).

For f(x) = x W + β (optionally inside the LN residual x + LN(·)γ + δ), per sequence, head and
mini-batch t, with keys K_t, queries Q_t (b, d), targets T_t (V_t, or V_t − K_t under the LN
residual), the causal b×b matrix A_t = η_t ⊙ (tril(Q_t K_tᵀ) + 1_bias) and the carry row
e_t = η_t[b−1]:
    Zk_t = K_t W_t + β_t,   G_t = ∂l/∂Zk_t (per-token pre-activation gradients),
    Zq_t = Q_t W_t + β_t − A_t G_t (the answers before the post),
    W_{t+1} = W_t − K_tᵀ (e_t ⊙ G_t),   β_{t+1} = β_t − Σ_j e_t,j G_t,j.
The backward runs the chain in reverse (Ŵ, β̂ = cotangents of the state after mini-batch t):
    u_t = K_t Ŵ + β̂,   Ĝ_t = −A_tᵀ Ẑq_t − e_t ⊙ u_t,   ê_t = −rowsum(G_t ⊙ u_t),
    Ẑk_t = (∂G_t/∂Zk_t)ᵀ Ĝ_t  (the LayerNorm gradient's own backward, `_ln_backward`),
    Ŵ ← Ŵ + [K_t; Q_t]ᵀ [Ẑk_t; Ẑq_t],   β̂ ← β̂ + Σ_rows [Ẑk_t; Ẑq_t],
and K̂ = Ẑk Wᵀ − (e ⊙ G) Ŵᵀ, Q̂ = Ẑq Wᵀ, Â = −Ẑq Gᵀ, T̂, γ̂, δ̂ follow outside the recurrence.

Layout and memory: arrays stay (B, H, M, b, ·) and the loops index the mini-batch axis in place
(`lax.fori_loop`; no per-head vmap, so no transposes of whole sequences). The forward keeps the
state only at the start of every group of `group` mini-batches; the backward walks the groups in
reverse, re-runs a group's forward to get its states, does the group's state-independent
products as batched matmuls, then its reverse recurrence. Storing a state per mini-batch instead
(d×d each, 4× a mini-batch of activations at b = 16) costs more memory traffic than recomputing.
Autodiff of the generic dual form instead transposes the whole scan step inside the loop, which
is several times slower on CPU, where these loops of small ops are overhead-bound.
Held equal to the generic dual form (and through it to the primal form) by tests/test_ttt_ops.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Config(NamedTuple):
    """Static choices: LN-residual eps (None: plain l2 loss), a bias β, the recompute group."""

    eps: float | None
    bias: bool
    group: int  # mini-batches per group; must divide M


def _t(x):
    return jnp.swapaxes(x, -1, -2)


def _at(x, t, axis=2):
    return jax.lax.dynamic_index_in_dim(x, t, axis, keepdims=False)


def _put(buf, x, t, axis=2):
    return jax.lax.dynamic_update_index_in_dim(buf, x, t, axis)


def _window(x, start, size, axis=2):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _row_means(*xs):
    """Means over the last axis of several same-shape arrays as one reduction -> (..., 1) each."""
    return tuple(jnp.mean(x, axis=-1, keepdims=True) for x in xs)


def ln_parts(Zk, T, scale, bias, eps):
    """Per-token gradient G = ∂/∂Zk ½‖LN(Zk)·scale + bias − T‖² and the pieces its backward needs.

    Zk, T (..., d); scale, bias broadcast against them. With x̂ = (Zk − μ)ρ, ρ = (var + eps)^-½
    and g = (x̂·scale + bias − T)·scale:  G = ρ h,  h = g − mean(g) − x̂ mean(g x̂).
    Returns (G, x̂, ρ, g, h, mean(g x̂)); eps None (no LN): G = Zk − T and the rest None.
    """
    if eps is None:
        return Zk - T, None, None, None, None, None
    mu, sq = _row_means(Zk, Zk * Zk)
    rho = jax.lax.rsqrt(jnp.maximum(sq - mu * mu, 0.0) + eps)  # (..., 1)
    xhat = (Zk - mu) * rho
    g = (xhat * scale + bias - T) * scale
    m1, m2 = _row_means(g, g * xhat)
    h = g - m1 - xhat * m2
    return rho * h, xhat, rho, g, h, m2


def _ln_backward(dG, parts, scale):
    """Ẑk and ĝ (cotangent of g) from Ĝ, the cotangent of G = ln_parts(...)[0]."""
    _, xhat, rho, g, h, m2 = parts
    d = dG.shape[-1]
    dh = rho * dG
    # ρ̂ = Σ Ĝ h;  h = g − mean(g) − x̂ mean(g x̂) takes mean(ĥ) and mean(ĥ x̂)
    m_rho, m_dh, m_dhx = _row_means(dG * h, dh, dh * xhat)
    dg = dh - m_dh - xhat * m_dhx
    dxhat = dg * scale * scale - g * m_dhx - dh * m2
    # x̂ = (Zk − μ)ρ: the LayerNorm backward, plus ρ's own use in G = ρ h (∂ρ/∂Zk = −ρ² x̂ / d)
    m_dx, m_dxx = _row_means(dxhat, dxhat * xhat)
    dZk = rho * (dxhat - m_dx - xhat * m_dxx) - (m_rho * rho * rho) * xhat
    return dZk, dg


def _forward(cfg, W, beta, K, Q, T, A, e, scale, bias):
    """The forward recurrence -> Zq (B, H, M, b, d_out), final W, β, and W, β at group starts."""
    b, M = K.shape[-2], K.shape[2]
    groups = M // cfg.group
    kq = jnp.concatenate([K, Q], axis=-2)  # (B, H, M, 2b, d_in): keys then queries

    def step(t, carry):
        W, beta, Zq = carry
        # (B, H, 2b, d_in) @ (B, H, d_in, d_out) -> (B, H, 2b, d_out)
        Z = _at(kq, t) @ W
        if cfg.bias:
            Z = Z + beta
        G = ln_parts(Z[..., :b, :], _at(T, t), scale, bias, cfg.eps)[0]  # (B, H, b, d_out)
        Zq = _put(Zq, Z[..., b:, :] - _at(A, t) @ G, t)  # (B, H, b, b) @ (B, H, b, d_out)
        eG = _at(e, t)[..., None] * G
        W = W - _t(_at(K, t)) @ eG  # (B, H, d_in, b) @ (B, H, b, d_out)
        if cfg.bias:
            beta = beta - jnp.sum(eG, axis=-2, keepdims=True)
        return W, beta, Zq

    def group(g, carry):
        W, beta, Zq, ckW, ckb = carry
        ckW, ckb = _put(ckW, W, g), _put(ckb, beta, g)
        start = g * cfg.group
        W, beta, Zq = jax.lax.fori_loop(start, start + cfg.group, step, (W, beta, Zq))
        return W, beta, Zq, ckW, ckb

    lead = W.shape[:2]
    ckW = jnp.zeros((*lead, groups, *W.shape[2:]), W.dtype)
    ckb = jnp.zeros((*lead, groups, *beta.shape[2:]), beta.dtype)
    Zq = jnp.zeros(T.shape, T.dtype)
    W, beta, Zq, ckW, ckb = jax.lax.fori_loop(0, groups, group, (W, beta, Zq, ckW, ckb))
    return Zq, W, beta, ckW, ckb


def _group_states(cfg, W, beta, K, T, e, scale, bias):
    """Re-run one group's recurrence from its starting state: W_t, β_t (B, H, group, ...)."""
    def step(t, carry):
        W, beta, Ws, bs = carry
        Ws, bs = _put(Ws, W, t), _put(bs, beta, t)
        K_t = _at(K, t)
        Z = K_t @ W + beta if cfg.bias else K_t @ W
        eG = _at(e, t)[..., None] * ln_parts(Z, _at(T, t), scale, bias, cfg.eps)[0]
        W = W - _t(K_t) @ eG
        if cfg.bias:
            beta = beta - jnp.sum(eG, axis=-2, keepdims=True)
        return W, beta, Ws, bs

    lead, n = W.shape[:2], cfg.group
    Ws = jnp.zeros((*lead, n, *W.shape[2:]), W.dtype)
    bs = jnp.zeros((*lead, n, *beta.shape[2:]), beta.dtype)
    return jax.lax.fori_loop(0, n, step, (W, beta, Ws, bs))[2:]


def _group_backward(cfg, W, beta, xs, dW, dbeta, scale, bias):
    """Cotangents of one group from its starting state and the cotangent of its end state.

    xs: the group's (K, Q, T, A, e, Ẑq), each (B, H, group, ...). Returns the cotangents of the
    starting state and the group's (K̂, Q̂, T̂, Â, ê) plus its share of γ̂, δ̂.
    """
    K, Q, T, A, e, dZq = xs
    b = K.shape[-2]
    Ws, bs = _group_states(cfg, W, beta, K, T, e, scale, bias)  # (B, H, n, d_in, d_out)
    Zk = K @ Ws + bs if cfg.bias else K @ Ws  # (B, H, n, b, d_out)
    parts = ln_parts(Zk, T, scale[:, :, None], bias[:, :, None], cfg.eps)
    G = parts[0]
    dGq = -(_t(A) @ dZq)  # −A_tᵀ Ẑq_t: (B, H, n, b, d_out)
    dA = -(dZq @ _t(G))  # −Ẑq_t G_tᵀ: (B, H, n, b, b)
    kq = jnp.concatenate([K, Q], axis=-2)  # (B, H, n, 2b, d_in)
    ln = cfg.eps is not None

    def step(i, carry):
        t = cfg.group - 1 - i  # reverse
        dW, dbeta, dZk_buf, dg_buf, de_buf, dWn_buf = carry
        kq_t, dZq_t = _at(kq, t), _at(dZq, t)
        parts_t = tuple(None if p is None else _at(p, t) for p in parts)
        u = kq_t[..., :b, :] @ dW  # (B, H, b, d_in) @ (B, H, d_in, d_out)
        if cfg.bias:
            u = u + dbeta
        dG = _at(dGq, t) - _at(e, t)[..., None] * u
        de = -jnp.sum(parts_t[0] * u, axis=-1)  # (B, H, b)
        dZk, dg = _ln_backward(dG, parts_t, scale) if ln else (dG, dG)
        dz = jnp.concatenate([dZk, dZq_t], axis=-2)  # (B, H, 2b, d_out)
        dWn_buf = _put(dWn_buf, dW, t)
        dW = dW + _t(kq_t) @ dz  # (B, H, d_in, 2b) @ (B, H, 2b, d_out)
        if cfg.bias:
            dbeta = dbeta + jnp.sum(dz, axis=-2, keepdims=True)
        return dW, dbeta, _put(dZk_buf, dZk, t), _put(dg_buf, dg, t), _put(de_buf, de, t), dWn_buf

    bufs = (jnp.zeros_like(Zk), jnp.zeros_like(Zk), jnp.zeros_like(e), jnp.zeros_like(Ws))
    dW, dbeta, dZk, dg, de, dWn = jax.lax.fori_loop(0, cfg.group, step, (dW, dbeta, *bufs))
    # K enters Zk_t = K_t W_t and the update −K_tᵀ (e_t ⊙ G_t); Q enters Q_t W_t (A: outside)
    dK = dZk @ _t(Ws) - (e[..., None] * G) @ _t(dWn)  # (B, H, n, b, d_in)
    dQ = dZq @ _t(Ws)
    if ln:  # g = (x̂·scale + bias − T)·scale
        xhat, sc, bi = parts[1], scale[:, :, None], bias[:, :, None]
        dT = -dg * sc
        dscale = jnp.sum(dg * (xhat * sc + bi - T + xhat * sc), axis=(2, 3))[:, :, None]
        dbias = jnp.sum(dg * sc, axis=(2, 3))[:, :, None]
    else:  # G = Zk − T
        dT, dscale, dbias = -dg, jnp.zeros_like(scale), jnp.zeros_like(bias)
    return dW, dbeta, (dK, dQ, dT, dA, de), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_dual(cfg, W, beta, K, Q, T, A, e, scale, bias):
    """The answers Zq (B, H, M, b, d_out) and the final W, β of the one-layer chain (module doc).

    W (B, H, d_in, d_out); beta (B, H, 1, d_out) (zeros, untouched, unless cfg.bias);
    K, Q (B, H, M, b, d_in); T (B, H, M, b, d_out); A (B, H, M, b, b); e (B, H, M, b);
    scale, bias (B, H, 1, d_out): LN params (unused when eps is None). M % cfg.group == 0.
    """
    return _forward(cfg, W, beta, K, Q, T, A, e, scale, bias)[:3]


def _fused_fwd(cfg, W, beta, K, Q, T, A, e, scale, bias):
    Zq, W_N, beta_N, ckW, ckb = _forward(cfg, W, beta, K, Q, T, A, e, scale, bias)
    return (Zq, W_N, beta_N), (ckW, ckb, K, Q, T, A, e, scale, bias)


def _fused_bwd(cfg, res, cts):
    ckW, ckb, K, Q, T, A, e, scale, bias = res
    dZq, dW, dbeta = cts
    n = cfg.group
    groups = K.shape[2] // n
    outs = tuple(jnp.zeros_like(x) for x in (K, Q, T, A, e))

    def group(i, carry):
        g = groups - 1 - i  # reverse
        dW, dbeta, outs, dscale, dbias = carry
        xs = tuple(_window(x, g * n, n) for x in (K, Q, T, A, e, dZq))
        dW, dbeta, grads, ds, db = _group_backward(
            cfg, _at(ckW, g), _at(ckb, g), xs, dW, dbeta, scale, bias
        )
        outs = tuple(jax.lax.dynamic_update_slice_in_dim(o, x, g * n, 2)
                     for o, x in zip(outs, grads, strict=True))
        return dW, dbeta, outs, dscale + ds, dbias + db

    init = (dW, dbeta, outs, jnp.zeros_like(scale), jnp.zeros_like(bias))
    dW, dbeta, outs, dscale, dbias = jax.lax.fori_loop(0, groups, group, init)
    if not cfg.bias:
        dbeta = jnp.zeros_like(dbeta)
    return (dW, dbeta, *outs, dscale, dbias)


fused_dual.defvjp(_fused_fwd, _fused_bwd)
