"""Pieces shared by the sequence mixers: RoPE, the causal depthwise convolution, head splitting,
parameter groups named like the official checkpoints, and option checks.

Notable choices:
- RoPE rotates interleaved pairs (x[2i], x[2i+1]) with θ = 10000 (ttt-lm-jax convention) and is
  computed from the positions on the fly, so no sequence length is baked into the module.
- The causal convolution takes an explicit left context ("tail"), which makes the full-sequence,
  prefill and single-step paths one function; its parameters have nn.Conv's layout and init.
- Inner-loop arithmetic runs in `inner_dtype(dtype)`: float32 for float32/bfloat16 compute (the TTT
  state stays float32), float64 when the whole layer runs in float64 (tests).
- `LayerNorm` is flax's LayerNorm (same parameters, same numbers) with a written-out backward, and
  the causal convolution has one too: XLA:CPU runs the reduce-of-a-product that autodiff makes of
  a broadcast multiply (a parameter's gradient) many times slower than the forward (LayerNorm at
  2048×768: 39 ms fwd+bwd with flax's, 5 ms with ours, 1 ms forward).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_INIT_SCALE = 0.02


def inner_dtype(dtype) -> jnp.dtype:
    """Dtype of the inner loop / attention arithmetic: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float = 1e-6):
    """LayerNorm over the last axis, flax's convention var = E[x²] − E[x]²; scale, bias (C,)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean, 0.0)
    rho = jax.lax.rsqrt(var + eps)  # (..., 1)
    xhat = (x - mean) * rho
    return xhat * scale + bias, (xhat, rho, scale)


def _layer_norm_bwd(eps, res, dy):
    xhat, rho, scale = res
    rows = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dy * xhat, axis=rows)  # plain column sums, nothing fused into them
    dbias = jnp.sum(dy, axis=rows)
    dxhat = dy * scale
    # mean(dx̂ ⊙ x̂) as a batched dot: XLA:CPU's fused reduce of a product of two arrays is slow
    C = dy.shape[-1]
    dot_x = jnp.einsum("...c,...c->...", dxhat, xhat)[..., None] / C
    dx = rho * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True) - xhat * dot_x)
    return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """flax.linen.LayerNorm (same parameters, same results) computed by `layer_norm`."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (C,), self.param_dtype)
        dt = inner_dtype(self.dtype)  # statistics in at least float32, like flax
        y = layer_norm(x.astype(dt), scale.astype(dt), bias.astype(dt), self.epsilon)
        return y.astype(self.dtype)


def split_heads(x, num_heads: int):
    """(B, N, C) -> (B, H, N, d), heads taken head-major from the C axis."""
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(0, 2, 1, 3)  # (B, H, N, d)


def merge_heads(x):
    """(B, H, N, d) -> (B, N, H·d)."""
    B, H, N, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * d)  # (B, N, C)


def apply_rope(x, positions, theta: float = 10000.0):
    """Rotary position embedding on interleaved pairs.

    x: (..., N, d) with d even; positions: (N,) integers (any offsets, e.g. t mod b) -> same shape.
    Pair i of token t is rotated by the angle positions[t] · θ^(−2i/d):
        (x_2i, x_2i+1) -> (x_2i cos − x_2i+1 sin, x_2i sin + x_2i+1 cos).
    The (N, d/2) cos/sin tables are computed once behind an optimization barrier (otherwise XLA
    fuses the transcendentals into the per-head product and recomputes them H times), and the
    rotation is two products with the pair-swapped x, with no stacking of the halves.
    """
    d = x.shape[-1]
    dtype = inner_dtype(x.dtype)
    freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=dtype) / d))  # (d/2,)
    angle = jnp.asarray(positions, dtype)[:, None] * freqs[None, :]  # (N, d/2)
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angle), jnp.sin(angle)))
    pairs = lambda t: jnp.repeat(t, 2, axis=-1)  # (N, d/2) -> (N, d): both members of a pair
    sign = jnp.tile(jnp.asarray([-1.0, 1.0], dtype), d // 2)  # (d,): −sin on x_2i, +sin on x_2i+1
    xf = x.astype(dtype)
    swapped = jnp.flip(xf.reshape(*x.shape[:-1], d // 2, 2), axis=-1).reshape(x.shape)
    out = xf * pairs(cos) + swapped * (pairs(sin) * sign)  # (..., N, d)
    return out.astype(x.dtype)


@jax.custom_vjp
def depthwise_causal(xp, kernel):
    """y_t = Σ_w xp_{t+w} K[w] for xp (B, w−1+N, C) (left context included), kernel (w, C).

    The backward is written out so that the kernel's gradient is a plain sum over tokens of a
    materialised product: autodiff gives XLA:CPU a fused reduce of a product (or, as an einsum, a
    transpose of the whole sequence), both many times slower than the forward.
    """
    return _depthwise_causal_fwd(xp, kernel)[0]


def _depthwise_causal_fwd(xp, kernel):
    w = kernel.shape[0]
    n = xp.shape[1] - (w - 1)
    return sum(xp[:, i : i + n, :] * kernel[i] for i in range(w)), (xp, kernel)


def _depthwise_causal_bwd(res, dy):
    xp, kernel = res
    w = kernel.shape[0]
    n = dy.shape[1]
    dxp = jnp.zeros_like(xp)
    dk = []
    for i in range(w):
        dxp = dxp.at[:, i : i + n, :].add(dy * kernel[i])
        prod = jax.lax.optimization_barrier(xp[:, i : i + n, :] * dy)  # (B, N, C), materialised
        dk.append(jnp.sum(prod, axis=(0, 1)))
    return dxp, jnp.stack(dk).astype(kernel.dtype)


depthwise_causal.defvjp(_depthwise_causal_fwd, _depthwise_causal_bwd)


class CausalConv(nn.Module):
    """Depthwise causal convolution over the token axis with bias (Mamba-style, width 4).

    Parameters match `nn.Conv(features, (width,), padding="CAUSAL", feature_group_count=features)`:
    kernel (width, 1, C) with lecun-normal init, bias (C,) zeros.
    y_t = Σ_w x_{t−width+1+w} K[w] + b.
    """

    features: int
    width: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, tail=None):
        """x (B, N, C); tail (B, width−1, C) = the inputs before x (zeros if None).

        Returns (y (B, N, C), new tail (B, width−1, C) = the last width−1 inputs of tail ++ x).
        """
        C, w = self.features, self.width
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (w, 1, C), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (C,), self.param_dtype)
        B, N, _ = x.shape
        if tail is None:
            tail = jnp.zeros((B, w - 1, C), x.dtype)
        xp = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # (B, w−1+N, C)
        kernel = kernel.astype(self.dtype)
        y = depthwise_causal(xp, kernel[:, 0, :])  # (B, N, C)
        y = (y + bias.astype(self.dtype)).astype(self.dtype)
        return y, xp[:, xp.shape[1] - (w - 1) :, :]


class ParamGroup(nn.Module):
    """A named group of raw parameters, so checkpoints read e.g. `ttt_norm/scale`.

    specs: ((name, initializer, shape), ...). Calling the module returns {name: array}.
    """

    specs: tuple
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self):
        return {
            n: self.param(n, init, tuple(shape), self.param_dtype) for n, init, shape in self.specs
        }


def dense(features: int, name: str, dtype, param_dtype, init_scale=DEFAULT_INIT_SCALE, bias=False):
    """A bias-free Dense with N(0, init_scale²) weights (the TTT-LM projections)."""
    return nn.Dense(
        features,
        use_bias=bias,
        kernel_init=nn.initializers.normal(init_scale),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def check_choice(name: str, value, allowed: Sequence) -> None:
    """ValueError unless value is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def check_heads(cls_name: str, width: int, num_heads: int, even_head_dim: bool) -> int:
    """Validate width/num_heads (and an even head dim for RoPE); return the head dim d."""
    if not (isinstance(width, int) and width > 0 and isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(
            f"{cls_name}: width and num_heads must be positive ints, got {width}, {num_heads}"
        )
    if width % num_heads:
        raise ValueError(f"{cls_name}: width {width} is not divisible by num_heads {num_heads}")
    d = width // num_heads
    if even_head_dim and d % 2:
        raise ValueError(
            f"{cls_name}: RoPE needs an even head dim, got width/num_heads = {d}; change the "
            f"width or heads, or pass rope=False"
        )
    return d


def check_input(cls_name: str, x, width: int, rank_name: str = "x") -> None:
    """ValueError unless x is a floating (B, N, C=width) array with N ≥ 1."""
    shape = tuple(jnp.shape(x))
    if len(shape) != 3 or shape[-1] != width or shape[1] < 1:
        raise ValueError(
            f"{cls_name}: {rank_name} must be (B, N, C={width}) with N >= 1, got {shape}"
        )
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(
            f"{cls_name}: {rank_name} must be floating point, got {jnp.result_type(x)}"
        )


def broadcast_heads(tree, batch: int):
    """Pytree with leading H -> leading (B, H) (per-sequence copies of a shared state)."""
    return jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch, *w.shape)), tree)


def mean_sq(x) -> jax.Array:
    """Mean of squares as a scalar of at least float32 (diagnostics)."""
    return jnp.mean(jnp.square(x.astype(inner_dtype(x.dtype))))
