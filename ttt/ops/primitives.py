"""Primitives every layer shares, as pure functions: LayerNorm, RMSNorm and L2 normalisation, the
causal depthwise convolution,
rotary position embedding (docs/design.md §3.3, §8.1, §8.2), the token-flattened projection, and
the causal mask of the attention ops.

Each exists once in the package: the inner learners, the dual form and the Flax modules all call
these.

Notable choices:
- LayerNorm has flax's statistics (parity with the official checkpoints), the variance taken in
  two passes, mean((x − μ)²): flax's E[x²] − E[x]² is the same number but cancels when |μ| ≫ σ
  (float32 dual-form gradients through a 4-feature LN lost ~2e-5 to it). It has a written-out
  backward (`layer_norm_backward`, also used by the dual form to get the
  inner gradients without autodiff). Autodiff of the forward would hand XLA:CPU a fused reduce of
  a product for every per-row/per-column factor, many times slower than these plain reductions
  and dots.
- The causal convolution takes an explicit left context ("tail"): the full-sequence, prefill and
  one-token paths are one function. Its backward is written out for the same XLA:CPU reason:
  the input gradient as the forward's shifted sum over the padded output gradient, the kernel
  gradient as a ones-vector product per tap (fwd+bwd at 64 × 64 tokens and 192 channels: 2.4×
  faster than a reduce over the two leading axes on a 2-core Intel Xeon, 2026-12-07).
- `project(x, w)` (and `project_dot_general`, the same for `nn.Dense`) multiplies on the 2-D
  (tokens, features) view. Same numbers as `x @ w`; the reason is again XLA:CPU: the weight
  gradient of a (B, N, K) @ (K, F) product is a dot_general contracting two axes, which it runs as
  transposes of the activations plus a slow dot, where the 2-D view gives one plain matmul (a
  SwiGLU fwd+bwd at 64×64 tokens, width 64: half the CPU time).
- RoPE rotates interleaved pairs (x[2i], x[2i+1]) at any integer positions (e.g. t mod b), so no
  sequence length is baked in.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _sum_to(x, shape):
    """Sum x over the axes that broadcasting added or stretched to reach x.shape from `shape`."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape)


# ----------------------------------------------------------------------------- LayerNorm


# Every product with a per-row factor is an einsum: autodiff of these functions (the dual form
# differentiates through them) then gives dots, not the reduce-of-a-product kernels that XLA:CPU
# runs many times slower.
_rows = functools.partial(jnp.einsum, "...d,...->...d")  # x (..., d) ⊙ s (...,) per row
_rowdot = functools.partial(jnp.einsum, "...d,...d->...")  # Σ_d x ⊙ y per row: (...,)


def layer_norm_stats(x, eps: float):
    """x (..., d) -> (x̂ = (x − μ)ρ (..., d), ρ = (var + eps)^−½ (...,)), var = mean((x − μ)²)."""
    d = x.shape[-1]
    mean = jnp.mean(x, axis=-1)  # (...,)
    xc = x - mean[..., None]
    var = _rowdot(xc, xc) / d
    rho = jax.lax.rsqrt(var + eps)
    return _rows(xc, rho), rho


def layer_norm_backward(dxhat, xhat, rho):
    """d loss / d x of x̂ = (x − μ)ρ, given d loss / d x̂ (..., d) and the forward's x̂, ρ (...,).

    dx = ρ (dx̂ − mean(dx̂) − x̂ mean(dx̂ ⊙ x̂)), every mean over the feature axis.
    """
    d = dxhat.shape[-1]
    centred = dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
    return _rows(centred - _rows(xhat, _rowdot(dxhat, xhat) / d), rho)


def _scaled(xhat, scale, bias):
    """x̂ · scale + bias, the per-feature product as an einsum when scale is one (d,) vector."""
    if jnp.ndim(scale) == 1:
        return jnp.einsum("...d,d->...d", xhat, scale) + bias
    return xhat * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float = 1e-6):
    """LayerNorm over the last axis: x̂ · scale + bias; x (..., d), scale and bias broadcast to x."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    xhat, rho = layer_norm_stats(x, eps)
    return _scaled(xhat, scale, bias), (xhat, rho, scale, bias)


def _layer_norm_bwd(eps, res, dy):
    del eps
    xhat, rho, scale, bias = res
    dscale = _sum_to(dy * xhat, jnp.shape(scale)).astype(jnp.result_type(scale))
    dbias = _sum_to(dy, jnp.shape(bias)).astype(jnp.result_type(bias))
    return layer_norm_backward(dy * scale, xhat, rho), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ----------------------------------------------------------------------------- RMSNorm, L2


def _sum_rows(x):
    """Σ over every axis but the last: x (..., d) -> (d,), as a ones-vector product over the
    (M, d) view, which XLA:CPU runs as a dot (a reduce over the leading axes ran ~2.5x slower)."""
    flat = x.reshape(-1, x.shape[-1])  # (M, d)
    return jnp.ones((flat.shape[0],), flat.dtype) @ flat


@jax.custom_vjp
def scale_features(x, s):
    """x (..., d) ⊙ s (d,) per feature. Its backward sums over the rows with a matrix-vector
    product (1's (M,) @ (dy ⊙ x) (M, d)), which XLA:CPU runs far faster than the reduce over
    the major axes autodiff would give (and needs no transpose, as an einsum's batch axis would)."""
    return x * s


def _scale_features_fwd(x, s):
    return x * s, (x, s)


def _scale_features_bwd(res, dy):
    x, s = res
    return dy * s, _sum_rows(dy * x).astype(s.dtype)


scale_features.defvjp(_scale_features_fwd, _scale_features_bwd)


def scale_rows(x, s):
    """x (..., d) ⊙ s (...,) per row, as an einsum (its gradients are dots, see the module
    notes)."""
    return _rows(x, s)


def rms_norm(x, scale, eps: float):
    """x / √(mean x² + eps) · scale over the last axis; scale (d,). Per-row factors are einsums
    and the scale a `scale_features`, so the gradients are dots (see the module notes)."""
    return scale_features(_rows(x, jax.lax.rsqrt(_rowdot(x, x) / x.shape[-1] + eps)), scale)


def l2_normalize(x, eps: float):
    """x / √(Σ x² + eps) over the last axis (the per-row factor an einsum, as `rms_norm`)."""
    return _rows(x, jax.lax.rsqrt(_rowdot(x, x) + eps))


# ----------------------------------------------------------------------------- causal convolution


@jax.custom_vjp
def _depthwise(xp, kernel):
    """y_t = Σ_w xp_{t+w} K[w]: xp (B, w−1+N, C) with the left context included, kernel (w, C)."""
    return _depthwise_fwd(xp, kernel)[0]


def _depthwise_fwd(xp, kernel):
    w = kernel.shape[0]
    n = xp.shape[1] - (w - 1)
    return sum(xp[:, i : i + n, :] * kernel[i] for i in range(w)), (xp, kernel)


def _depthwise_bwd(res, dy):
    xp, kernel = res
    w = kernel.shape[0]
    n = dy.shape[1]
    # dxp_s = Σ_i dy_{s−i} K[i]: the forward's shifted sum over dy padded by w − 1 on each side
    dyp = jnp.pad(dy, ((0, 0), (w - 1, w - 1), (0, 0)))
    L = xp.shape[1]
    dxp = sum(dyp[:, w - 1 - i : w - 1 - i + L, :] * kernel[i] for i in range(w))
    # dK[i] = Σ_{b,t} xp_{b,t+i} dy_{b,t}
    dk = [_sum_rows(xp[:, i : i + n, :] * dy) for i in range(w)]
    return dxp, jnp.stack(dk).astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def causal_conv(x, kernel, bias=None, tail=None):
    """Depthwise causal convolution over the token axis, continuing from a left context.

    x (B, N, C); kernel (w, C); bias (C,) or None; tail (B, w − 1, C): the w − 1 inputs before x
    (zeros when None). y_t = Σ_i x_{t−w+1+i} K[i] + bias.
    Returns (y (B, N, C), new tail (B, w − 1, C) = the last w − 1 inputs of tail ++ x).
    """
    w = kernel.shape[0]
    B, _, C = x.shape
    if tail is None:
        tail = jnp.zeros((B, w - 1, C), x.dtype)
    xp = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # (B, w − 1 + N, C)
    y = _depthwise(xp, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y, xp[:, xp.shape[1] - (w - 1) :, :]


# ----------------------------------------------------------------------------- projections


def project(x, w):
    """x (..., K) @ w (K, F) -> (..., F), computed as one (M, K) @ (K, F) product, M = the
    product of the leading axes (see the module notes: the backward is the reason)."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*lead, w.shape[-1])  # (M, F) -> (..., F)


def project_dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, **kwargs):
    """`jax.lax.dot_general` for `nn.Dense(dot_general=...)`: a contraction of lhs's last axis
    with rhs's first (what Dense asks for) runs on the 2-D view like `project`; any other
    contraction goes to `jax.lax.dot_general` unchanged."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (tuple(lc), tuple(rc), tuple(lb), tuple(rb)) != ((lhs.ndim - 1,), (0,), (), ()) or \
            lhs.ndim <= 2 or rhs.ndim != 2:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    lead = lhs.shape[:-1]
    y = jax.lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type,
                            **kwargs)  # (M, F)
    return y.reshape(*lead, rhs.shape[1])


# ----------------------------------------------------------------------------- RoPE


def rope(x, positions, theta: float = 10000.0):
    """Rotary position embedding on interleaved pairs.

    x: (..., N, d) with d even; positions: (N,) integers (any offsets, e.g. t mod b) -> same shape.
    Pair i of token t is rotated by the angle positions[t] · θ^(−2i/d):
        (x_2i, x_2i+1) -> (x_2i cos − x_2i+1 sin, x_2i sin + x_2i+1 cos).
    The (N, d/2) cos/sin tables are constants when the positions are known at trace time (a
    training step), else computed once behind an optimization barrier: XLA otherwise fuses the
    transcendentals into every consumer (the per-head product and, in the backward, each fused
    transpose) and recomputes them per element. The rotation is two products with the
    pair-swapped x, with no stacking of the halves.
    """
    d = x.shape[-1]
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    if not isinstance(positions, jax.core.Tracer):  # static positions: tables as constants
        freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))  # (d/2,)
        angle = np.asarray(positions, np.float64)[:, None] * freqs[None, :]  # (N, d/2)
        cos, sin = jnp.asarray(np.cos(angle), dtype), jnp.asarray(np.sin(angle), dtype)
    else:
        freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=dtype) / d))  # (d/2,)
        angle = jnp.asarray(positions, dtype)[:, None] * freqs[None, :]  # (N, d/2)
        cos, sin = jax.lax.optimization_barrier((jnp.cos(angle), jnp.sin(angle)))
    pairs = lambda t: jnp.repeat(t, 2, axis=-1)  # (N, d/2) -> (N, d): both members of a pair
    sign = jnp.tile(jnp.asarray([-1.0, 1.0], dtype), d // 2)  # (d,): −sin on x_2i, +sin on x_2i+1
    xf = x.astype(dtype)
    swapped = jnp.flip(xf.reshape(*x.shape[:-1], d // 2, 2), axis=-1).reshape(x.shape)
    out = xf * pairs(cos) + swapped * (pairs(sin) * sign)  # (..., N, d)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- causal mask


def causal_mask(n: int) -> jax.Array:
    """(n, n) bool, True where key s may be seen by query t (s <= t, diagonal included)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))
