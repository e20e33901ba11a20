"""Sliding-window softmax attention as a mixer: each token attends to itself and the window − 1
tokens before it, through `ttt.ops.window_attn`.

Projections wq, wk, wv, wo (head-major split of C) and RoPE on absolute positions as
`SoftmaxAttention` (same parameter names and numbers: with window ≥ N the two agree exactly).

Notable choices:
- The forward runs `window_attention` (O(N w) work and memory, flash attention's backward).
- Decoding keeps a ring buffer of the last `window` keys and values (slot p mod w holds position
  p), so the cache is constant in the context length, unlike the softmax KV cache; a step reads
  the window before overwriting the slot of position pos − w.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, window_attn
from ttt.ops.primitives import rope


class SlidingWindowAttention(nn.Module):
    """Causal multi-head softmax attention over the last `window` tokens (itself included).

    Attributes: width, num_heads; window; rope (absolute positions, θ = rope_theta); use_bias on
    the projections; block: query block of `window_attention` (None: min(window, 128));
    init_scale; dtype; param_dtype.
    """

    width: int
    num_heads: int
    window: int = 512
    rope: bool = True
    rope_theta: float = 10000.0
    use_bias: bool = False
    block: int | None = None
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=self.rope)
        checks.check_int("window", self.window, 1)
        if self.block is not None:
            checks.check_int("block", self.block, 1)
        super().__post_init__()

    @nn.compact
    def _run(self, mode, x, cache=None):
        checks.check_input(type(self).__name__, x, self.width)
        C, dt, pdt = self.width, self.dtype, self.param_dtype
        dense = lambda name: common.dense(C, name, dt, pdt, self.init_scale, bias=self.use_bias)
        x = x.astype(dt)
        q, k, v = (common.split_heads(dense(n)(x), self.num_heads) for n in ("wq", "wk", "wv"))
        pos0 = cache["pos"] if mode == "step" else 0
        t = pos0 + jnp.arange(x.shape[1])  # (N,) absolute positions
        if self.rope:
            q, k = rope(q, t, self.rope_theta), rope(k, t, self.rope_theta)
        idt = common.inner_dtype(dt)
        q, k, v = q.astype(idt), k.astype(idt), v.astype(idt)
        out = lambda z: dense("wo")(common.merge_heads(z.astype(dt)))  # (B, H, N, d) -> (B, N, C)
        if mode == "step":
            z, K, V = window_attn.window_attention_decode_step(
                cache["k"], cache["v"], q[:, :, 0], k[:, :, 0], v[:, :, 0], cache["pos"])
            return out(z[:, :, None]), {"k": K, "v": V, "pos": cache["pos"] + 1}
        y = out(window_attn.window_attention(q, k, v, window=self.window, block=self.block))
        if mode == "call":
            return y, {}
        K, V = window_attn.window_cache(k, v, self.window)
        return y, {}, {"k": K, "v": V, "pos": jnp.asarray(x.shape[1], jnp.int32)}

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {})."""
        del ttt_lr_mult, train
        return self._run("call", x)

    def init_cache(self, batch_size: int, dtype=None):
        """Empty ring buffers {"k", "v": (B, H, window, d), "pos": int32}."""
        shape = (batch_size, self.num_heads, self.window, self.width // self.num_heads)
        idt = common.inner_dtype(dtype or self.dtype)
        return {"k": jnp.zeros(shape, idt), "v": jnp.zeros(shape, idt),
                "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y, {}, cache holding the last min(N, window) keys/values)."""
        del ttt_lr_mult
        return self._run("prefill", x)

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        del ttt_lr_mult
        checks.check_step(type(self).__name__, x_t, cache, ("k", "v", "pos"), self.width)
        return self._run("step", x_t, cache)
