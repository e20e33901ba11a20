"""Pieces the Flax mixers share: head splitting, parameter groups named like the official
checkpoints, the inner model's initial state, and thin Flax modules around the pure primitives of
`ttt.ops.primitives` (LayerNorm, the causal depthwise convolution).

Notable choices:
- Inner-loop arithmetic runs in `inner_dtype(dtype)`: float32 for float32/bfloat16 compute (the TTT
  state stays float32), float64 when the whole layer runs in float64 (tests).
- `LayerNorm` has flax's parameters and numbers; `CausalConv` has `nn.Conv(padding="CAUSAL",
  feature_group_count=C)`'s parameters and init; both compute through the one primitive of each.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.ops import primitives

DEFAULT_INIT_SCALE = 0.02


def inner_dtype(dtype) -> jnp.dtype:
    """Dtype of the inner loop / attention arithmetic: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


class LayerNorm(nn.Module):
    """flax.linen.LayerNorm (same parameters, same results) computed by `primitives.layer_norm`."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (C,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (C,), self.param_dtype)
        dt = inner_dtype(self.dtype)  # statistics in at least float32, like flax
        y = primitives.layer_norm(x.astype(dt), scale.astype(dt), bias.astype(dt), self.epsilon)
        return y.astype(self.dtype)


# Mesh axes of the activations (ttt.train.parallel): the batch is split over data x fsdp, heads
# (and a head-major feature axis) over model.
BATCH = ("data", "fsdp")
HEADS = "model"


def shard(x, *spec):
    """`x` constrained to `spec` (one entry per axis: None, a mesh axis or a tuple of them) on the
    mesh set by `jax.set_mesh`; the identity when no mesh is set (one device, pmap, decoding).

    A None entry keeps that axis whole. Mesh axes the current mesh lacks, has at size 1, or that
    do not divide their array axis are left out, so one call site serves every mesh (a batch of 1
    at init is simply not split).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Manual in mesh.axis_types:  # no mesh; pmap
        return x
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    out = []
    for dim, entry in zip(x.shape, spec, strict=True):
        names = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ())
                      if sizes.get(a, 1) > 1)
        fits = names and dim % math.prod(sizes[a] for a in names) == 0
        out.append((names if len(names) > 1 else names[0]) if fits else None)
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*out))


def split_heads(x, num_heads: int):
    """(B, N, C) -> (B, H, N, d), heads taken head-major from the C axis (heads over `model`)."""
    B, N, C = x.shape
    x = x.reshape(B, N, num_heads, C // num_heads).transpose(0, 2, 1, 3)  # (B, H, N, d)
    return shard(x, BATCH, HEADS, None, None)


def merge_heads(x):
    """(B, H, N, d) -> (B, N, H·d), the feature axis head-major (split over `model`)."""
    B, H, N, d = x.shape
    return shard(x.transpose(0, 2, 1, 3).reshape(B, N, H * d), BATCH, None, HEADS)  # (B, N, C)


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
        y, new_tail = primitives.causal_conv(x, kernel[:, 0, :].astype(self.dtype),
                                             bias.astype(self.dtype), tail)
        return y.astype(self.dtype), new_tail


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
    """A bias-free Dense with N(0, init_scale²) weights (the TTT-LM projections), multiplying on
    the 2-D (tokens, features) view (`primitives.project_dot_general`)."""
    return nn.Dense(
        features,
        use_bias=bias,
        kernel_init=nn.initializers.normal(init_scale),
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=primitives.project_dot_general,
        name=name,
    )


def inner_weights(learner, d: int, num_heads: int, make=None, dtype=jnp.float32) -> dict:
    """The inner model's initial state W0 with a leading H axis, one entry per dense layer.

    make(l, kernel_shape, bias_shape or None) -> (kernel, bias or None) creates the parameters of
    dense layer l (each mixer names and initialises them its own way); make=None gives zeros (a
    state the outer loop does not learn). Shapes come from `learner.init(key, d)`.
    """
    shapes = jax.eval_shape(lambda key: learner.init(key, d), jax.random.PRNGKey(0))
    lead = lambda name: (num_heads, *shapes[name].shape)
    W0 = {}
    for l, (w_name, b_name) in enumerate(learner.dense):
        bias_shape = lead(b_name) if b_name is not None else None
        if make is not None:
            W0[w_name], b = make(l, lead(w_name), bias_shape)
        else:
            W0[w_name] = jnp.zeros(lead(w_name), dtype)
            b = None if b_name is None else jnp.zeros(bias_shape, dtype)
        if b_name is not None:
            W0[b_name] = b
    return W0


def inner_tree(module, learner, d: int, num_heads: int, learn: bool, dtype=jnp.float32):
    """W0 of a learner without a dense-chain description: its whole pytree (leading H) as ONE
    parameter "W0" drawn by `learner.init` per head, or zeros when the outer loop does not learn
    it. (Dense-chain learners get one named parameter per layer: `inner_weights`.)"""
    def init(key):
        return jax.vmap(lambda k: learner.init(k, d))(jax.random.split(key, num_heads))

    if not learn:
        shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, dtype), shapes)
    return module.param("W0", lambda key: jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                                                 init(key)))
