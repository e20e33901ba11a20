"""ViT classifier around any sequence mixer (MTTT, docs/design.md §10.2).

Notable choices (big_vision's ViT, which the official mttt code adapts):
- Tokens: 16×16 patches with a fixed 2-D sin-cos position embedding, or raw pixels
  (`patch_size=0`: every pixel a token) with a learned one, N(0, 1/width).
- Block: `x += mixer(LN(x))`, `x += MLP(LN(x))`, GELU (tanh) MLP; final LN.
- Head: global average pool -> Dense -> tanh ("pre_logits") -> zero-initialised Dense, so every
  logit is 0 at initialisation.
- Names follow big_vision: `embedding`, `pos_embedding`, `Transformer/encoderblock`,
  `Transformer/encoder_norm`, `pre_logits`, `head`.
- Hybrid stacks (`pattern` of `ttt.models.hybrid.Layer`, the non-causal twins): blocks at
  `Transformer/encoderblock/pattern_<j>` when scanned, aux keyed the same (ttt/models/stack.py).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttt import layers
from ttt.layers.common import BATCH, shard
from ttt.models.stack import make_stack

Array = jax.Array


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> Array:
    """Fixed 2-D position embedding: [sin x, cos x, sin y, cos y] at width/4 frequencies each.

    Returns (1, h·w, width), tokens in row-major (y, x) order like the patch reshape.
    """
    if width % 4:
        raise ValueError(f"sincos 2-D position embedding needs width % 4 == 0, got {width}")
    y, x = np.mgrid[:h, :w]  # (h, w) each
    omega = 1.0 / temperature ** (np.arange(width // 4) / max(width // 4 - 1, 1))  # (width/4,)
    ang_y = np.einsum("m,d->md", y.ravel(), omega)  # (h·w, width/4)
    ang_x = np.einsum("m,d->md", x.ravel(), omega)  # (h·w, width/4)
    pe = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
    return jnp.asarray(pe, jnp.float32)[None]  # (1, h·w, width)


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> GELU -> Dense(C), xavier kernels, near-zero biases.

    (B, N, C) -> (B, N, C).
    """

    mlp_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.normal(1e-6), dtype=self.dtype,
                  param_dtype=self.param_dtype)
        hidden = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0", **kw)(x))  # (B, N, mlp_dim)
        return nn.Dense(x.shape[-1], name="Dense_1", **kw)(hidden)


class EncoderBlock(nn.Module):
    """One pre-LN block; scan convention `(x, train) -> (x, aux)`."""

    width: int
    num_heads: int
    mlp_dim: int
    mixer: str
    mixer_kwargs: tuple = ()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        ln = lambda: layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype)
        self.LayerNorm_0 = ln()
        self.seq_modeling_block = layers.make_mixer(
            self.mixer, self.width, self.num_heads, dtype=self.dtype,
            param_dtype=self.param_dtype, **dict(self.mixer_kwargs))
        self.LayerNorm_1 = ln()
        self.MlpBlock_0 = MlpBlock(self.mlp_dim, self.dtype, self.param_dtype)

    def __call__(self, x: Array, train: bool) -> tuple[Array, dict]:
        # split over the batch, whole on `model` at block boundaries (as the LM's Block)
        x = shard(x, BATCH, None, None)
        y, aux = self.seq_modeling_block(self.LayerNorm_0(x), train=train)
        x = shard(x + y.astype(x.dtype), BATCH, None, None)
        return shard(x + self.MlpBlock_0(self.LayerNorm_1(x)), BATCH, None, None), aux


class Encoder(nn.Module):
    """Stack of EncoderBlocks + final LayerNorm. (B, N, C) -> ((B, N, C), aux (layers, ...))."""

    num_layers: int
    block: Any
    scan_layers: bool = True
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool) -> tuple[Array, dict]:
        stack = make_stack(self.block, self.num_layers, scan=self.scan_layers, remat=self.remat,
                           per_layer={"__call__": (False,)}, static_argnums=(2,),
                           rng_names=("params", "inner"), name="encoderblock")
        x, aux = stack(x, train)
        norm = layers.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="encoder_norm")
        return norm(x), aux


class ViT(nn.Module):
    """Image classifier. `apply(vars, images (B, H, W, C), train=bool, rngs={"inner": key})`
    -> (logits (B, num_classes) float32, aux: mixer diagnostics stacked (num_layers, ...), or
    for a hybrid {"pattern_<j>": stacked (num_layers / k, ...)}).

    `pattern`: empty, every layer builds `mixer`; else a tuple of `ttt.models.hybrid.Layer`
    whose mixers and kwargs replace `mixer` / `mixer_kwargs` (their pre_conv is not read).
    """

    num_classes: int
    num_layers: int
    width: int
    num_heads: int
    mlp_dim: int
    mixer: str
    mixer_kwargs: tuple = ()
    patch_size: int = 16  # 0: every pixel is a token
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    pattern: tuple = ()  # ttt.models.hybrid.Layer entries of a hybrid stack

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict]:
        b, height, width, _ = images.shape
        p = self.patch_size or 1
        if height % p or width % p:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {p}")
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="embedding")(images)  # (B, H/p, W/p, C)
        x = x.reshape(b, -1, self.width)  # (B, N, C)
        if self.patch_size:
            pos = posemb_sincos_2d(height // p, width // p, self.width)
        else:
            pos = self.param("pos_embedding", nn.initializers.normal(1 / np.sqrt(self.width)),
                             (1, x.shape[1], self.width), self.param_dtype)
        x = x + pos.astype(x.dtype)

        common = functools.partial(
            EncoderBlock, width=self.width, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            dtype=self.dtype, param_dtype=self.param_dtype)
        if self.pattern:
            block = tuple(functools.partial(common, mixer=layer.mixer,
                                            mixer_kwargs=layer.mixer_kwargs)
                          for layer in self.pattern)
        else:
            block = functools.partial(common, mixer=self.mixer, mixer_kwargs=self.mixer_kwargs)
        x, aux = Encoder(self.num_layers, block, self.scan_layers, self.remat, self.dtype,
                         self.param_dtype, name="Transformer")(x, train)

        x = jnp.mean(x, axis=1)  # (B, C)
        x = nn.tanh(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="pre_logits")(x))
        logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="head")(x)
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32)), aux
