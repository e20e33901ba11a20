"""Causal language model around any sequence mixer (TTT-LM, docs/design.md §10.1).

Notable choices:
- Block: `h += conv(RMSNorm(h))` (Mamba backbone only), `h += mixer(RMSNorm(h))`,
  `h += SwiGLU(RMSNorm(h))`; final RMSNorm; logits `h Eᵀ` with the embedding E tied, in float32.
- Parameter names follow the official ttt-lm-jax tree (`wte`, `h/<i>/seq_norm`, `conv/conv1`,
  `seq_modeling_block`, `ffn_norm`, `feed_forward/{w1,w2,w3}`, `ln_f`; RMSNorm weight `kernel`)
  minus its outer `model/` scope, so official checkpoints map by a prefix.
- Parameters are float32 (or float64 under x64); `dtype` is the compute dtype of activations.
- Decoding (`init_cache`, `prefill`, `step`) delegates to the mixers' decode paths; the pre-conv
  keeps its last `conv_width - 1` normalised inputs as its own cache.
- Hybrid stacks (`pattern`, ttt/models/hybrid.py): each position of the repeated unit has its
  own mixer, kwargs and pre-conv switch; params, aux and caches are keyed by position
  (`h/pattern_<j>/...`, ttt/models/stack.py), each layer with its own cache type.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt import layers
from ttt.layers.common import BATCH, HEADS, CausalConv, shard
from ttt.models.stack import make_stack
from ttt.ops.primitives import project, project_dot_general

Array = jax.Array


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · g over the last axis, statistics in float32.

    (..., C) -> (..., C).
    """

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        g = self.param("kernel", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.promote_types(self.dtype, jnp.float32))
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * g.astype(self.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x), no biases, N(0, init_std) kernels. (B, N, C) -> (B, N, C)."""

    hidden: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dense = lambda features, name: nn.Dense(
            features, use_bias=False, kernel_init=nn.initializers.normal(self.init_std),
            dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=project_dot_general, name=name)  # 2-D view: a faster backward on CPU
        gate = nn.silu(dense(self.hidden, "w1")(x)) * dense(self.hidden, "w3")(x)  # (B, N, F)
        return dense(x.shape[-1], "w2")(gate)


class PreConv(nn.Module):
    """Depthwise causal convolution of RMSNorm(h) (Mamba backbone, docs/design.md §10.1).

    (B, N, C) -> (B, N, C). The convolution is `ttt.layers.common.CausalConv` (the one causal conv
    of the package), so the full sequence, prefill and one-token step share its code.

    Decode cache: the last `width - 1` normalised inputs (B, width - 1, C).
    """

    channels: int
    width: int = 4
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.conv_norm = RMSNorm(self.eps, self.dtype, self.param_dtype)
        self.conv1 = CausalConv(self.channels, self.width, self.dtype, self.param_dtype)

    def __call__(self, h: Array) -> Array:
        return self.conv1(self.conv_norm(h))[0]

    def prefill(self, h: Array) -> tuple[Array, Array]:
        return self.conv1(self.conv_norm(h))  # (B, N, C), tail (B, width-1, C)

    def step(self, h_t: Array, tail: Array) -> tuple[Array, Array]:
        return self.conv1(self.conv_norm(h_t), tail)

    def init_cache(self, batch_size: int) -> Array:
        return jnp.zeros((batch_size, self.width - 1, self.channels), self.dtype)


class Block(nn.Module):
    """One residual block; methods follow scan's `(carry, *args) -> (carry, out)` convention."""

    width: int
    num_heads: int
    ffn_dim: int
    mixer: str
    mixer_kwargs: tuple = ()
    pre_conv: bool = False
    conv_width: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        norm = lambda: RMSNorm(self.norm_eps, self.dtype, self.param_dtype)
        if self.pre_conv:
            self.conv = PreConv(self.width, self.conv_width, self.norm_eps, self.dtype,
                                self.param_dtype)
        self.seq_norm = norm()
        self.seq_modeling_block = layers.make_mixer(
            self.mixer, self.width, self.num_heads, dtype=self.dtype,
            param_dtype=self.param_dtype, **dict(self.mixer_kwargs))
        self.ffn_norm = norm()
        self.feed_forward = SwiGLU(self.ffn_dim, self.init_std, self.dtype, self.param_dtype)

    def _ffn(self, h: Array) -> Array:
        return h + self.feed_forward(self.ffn_norm(h))

    def __call__(self, h: Array, ttt_lr_mult) -> tuple[Array, dict]:
        # The residual stream is split over the batch and whole on `model` at block boundaries:
        # the mixer and the SwiGLU each end in one reduction over `model` (ttt.train.parallel).
        h = shard(h, BATCH, None, None)
        if self.pre_conv:
            h = h + self.conv(h)
        y, aux = self.seq_modeling_block(self.seq_norm(h), ttt_lr_mult=ttt_lr_mult)
        h = shard(h + y.astype(h.dtype), BATCH, None, None)
        return shard(self._ffn(h), BATCH, None, None), aux

    def prefill(self, h: Array) -> tuple[Array, tuple[dict, dict]]:
        cache = {}
        if self.pre_conv:
            dh, cache["conv"] = self.conv.prefill(h)
            h = h + dh
        y, aux, cache["mixer"] = self.seq_modeling_block.prefill(self.seq_norm(h))
        return self._ffn(h + y.astype(h.dtype)), (aux, cache)

    def step(self, h_t: Array, cache: dict) -> tuple[Array, dict]:
        new = {}
        if self.pre_conv:
            dh, new["conv"] = self.conv.step(h_t, cache["conv"])
            h_t = h_t + dh
        y, new["mixer"] = self.seq_modeling_block.step(self.seq_norm(h_t), cache["mixer"])
        return self._ffn(h_t + y.astype(h_t.dtype)), new

    def init_cache(self, carry, batch_size: int) -> tuple[Any, dict]:
        cache = {"mixer": self.seq_modeling_block.init_cache(batch_size, self.dtype)}
        if self.pre_conv:
            cache["conv"] = self.conv.init_cache(batch_size)
        return carry, cache


# Which positional arguments (after the carry) of each Block method carry a leading layer axis.
_PER_LAYER = {"__call__": (False,), "prefill": (), "step": (True,), "init_cache": (False,)}


class CausalLM(nn.Module):
    """Decoder-only LM. `apply(vars, input_ids (B, N) int32, ttt_lr_mult=1.0)`
    -> (logits (B, N, V) float32 (float64 for a float64 model),
        aux: mixer diagnostics stacked (num_layers, ...); for a hybrid
        {"pattern_<j>": diagnostics stacked (num_layers / k, ...)}).

    `pattern`: empty, every layer builds `mixer` with `mixer_kwargs` (and `pre_conv`); else a
    tuple of `ttt.models.hybrid.Layer` (k entries dividing num_layers), whose own fields replace
    those three (`mixer` is then only a label).
    """

    vocab_size: int
    num_layers: int
    width: int
    num_heads: int
    ffn_dim: int
    mixer: str
    mixer_kwargs: tuple = ()  # sorted (key, value) pairs, so the module stays hashable
    pre_conv: bool = False
    conv_width: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True
    remat: str = "none"
    pattern: tuple = ()  # ttt.models.hybrid.Layer entries of a hybrid stack

    def setup(self):
        self.wte = nn.Embed(self.vocab_size, self.width,
                            embedding_init=nn.initializers.normal(self.init_std),
                            dtype=self.dtype, param_dtype=self.param_dtype)
        common = functools.partial(
            Block, width=self.width, num_heads=self.num_heads, ffn_dim=self.ffn_dim,
            conv_width=self.conv_width, norm_eps=self.norm_eps, init_std=self.init_std,
            dtype=self.dtype, param_dtype=self.param_dtype)
        if self.pattern:
            block = tuple(functools.partial(common, mixer=layer.mixer,
                                            mixer_kwargs=layer.mixer_kwargs,
                                            pre_conv=layer.pre_conv) for layer in self.pattern)
        else:
            block = functools.partial(common, mixer=self.mixer, mixer_kwargs=self.mixer_kwargs,
                                      pre_conv=self.pre_conv)
        self.h = make_stack(block, self.num_layers, scan=self.scan_layers,
                            remat=self.remat, per_layer=_PER_LAYER, name="h")
        self.ln_f = RMSNorm(self.norm_eps, self.dtype, self.param_dtype)

    def _logits(self, h: Array) -> Array:
        out = jnp.promote_types(self.dtype, jnp.float32)  # float32 (float64 in x64 runs)
        h = self.ln_f(h).astype(out)
        e = self.wte.embedding.astype(out)  # (V, C)
        return shard(project(h, e.T), BATCH, None, HEADS)  # (B, N, C) @ (C, V): V on model

    def _embed(self, input_ids: Array) -> Array:
        """nn.Embed's lookup, with the table's vocabulary split over `model` and its width whole
        (under FSDP the width is gathered first): a gather XLA partitions by masking and one
        reduction over `model`, instead of replicating the table."""
        e = shard(self.wte.embedding, HEADS, None).astype(self.dtype)  # (V, C)
        return jnp.take(e, input_ids, axis=0)  # (B, N, C)

    def __call__(self, input_ids: Array, ttt_lr_mult=1.0) -> tuple[Array, dict]:
        h, aux = self.h(self._embed(input_ids), ttt_lr_mult)
        return self._logits(h), aux

    def init_cache(self, batch_size: int) -> dict:
        """Empty decode state for `batch_size` sequences; every leaf has a leading layer axis
        (for a hybrid: {"pattern_<j>": that position's cache, leading axis num_layers / k})."""
        return self.h.init_cache(jnp.zeros(()), batch_size)[1]

    def prefill(self, input_ids: Array, cache: dict | None = None) -> tuple[Array, dict]:
        """Read a prompt (B, N0) from the start of the sequence -> (logits (B, N0, V), cache).

        `cache` (from `init_cache`) is accepted for interface symmetry; a prompt always starts a
        new sequence, so its contents are not read.
        """
        del cache
        h, (_, cache) = self.h.prefill(self._embed(input_ids))
        return self._logits(h), cache

    def step(self, token: Array, cache: dict) -> tuple[Array, dict]:
        """One decode step: token (B, 1) int32 -> (logits (B, 1, V), cache)."""
        h, cache = self.h.step(self._embed(token), cache)
        return self._logits(h), cache

