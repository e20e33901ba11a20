"""Attention baselines with the mixer interface: softmax attention and linear attention.

Both are (B, N, C) -> (B, N, C) with projections wq, wk, wv, wo (head-major split of C) and call
the pure ops in `ttt.ops.softmax_attn` and `ttt.ops.linear_attn`. Causal by default with a decode
path; `causal=False` gives the vision (non-causal) baselines, which have no decode path.

Notable choices:
- Softmax attention runs through `ttt.ops.softmax_attn.softmax_attention`: cuDNN's fused attention
  on a GPU in bf16, elsewhere XLA over query chunks; memory linear in the sequence length either
  way.
- Softmax attention decodes with a preallocated KV cache of `cache_size` tokens (static shapes, so
  a jitted step compiles once). `prefill` refuses prompts longer than `cache_size`; a step past the
  end cannot be detected under jit (the write would be clamped), so stop generating there.
- RoPE (softmax only, on by default for the causal LM baseline) uses absolute positions and the
  interleaved-pair convention of the TTT layer.
- Linear attention's decode state is the running sums S = Σ φ(k) vᵀ and s = Σ φ(k): constant size.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, linear_attn, softmax_attn
from ttt.ops.primitives import rope

FEATURE_MAPS = (None, "elu")
NORMALIZERS = (None, "adaptive", "constant")


def _qkv(module, x, use_bias):
    """Shared projections: x (B, N, C) -> q, k, v (B, H, N, d) in module.dtype."""
    C, dt, pdt = module.width, module.dtype, module.param_dtype
    x = x.astype(dt)
    out = []
    for name in ("wq", "wk", "wv"):
        y = common.dense(C, name, dt, pdt, module.init_scale, bias=use_bias)(x)
        out.append(common.split_heads(y, module.num_heads))
    return out


def _out(module, z, use_bias):
    """z (B, H, N, d) -> (B, N, C) through wo."""
    C, dt, pdt = module.width, module.dtype, module.param_dtype
    y = common.merge_heads(z.astype(dt))
    return common.dense(C, "wo", dt, pdt, module.init_scale, bias=use_bias)(y)


def _no_decode(module):
    raise ValueError(f"{type(module).__name__}(causal=False) is non-causal: it has no decode path")


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention (E4: the Nadaraya–Watson TTT with a growing key/value set).

    Attributes: width, num_heads; causal; rope (absolute positions, θ = rope_theta); use_bias on
    the projections; cache_size (tokens the decode KV cache holds); init_scale; dtype; param_dtype.
    """

    width: int
    num_heads: int
    causal: bool = True
    rope: bool = True
    rope_theta: float = 10000.0
    use_bias: bool = False
    cache_size: int = 2048
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=self.rope)
        if not (isinstance(self.cache_size, int) and self.cache_size >= 1):
            raise ValueError(f"cache_size: expected a positive int, got {self.cache_size!r}")
        super().__post_init__()

    @nn.compact
    def _run(self, mode, x, cache=None):
        checks.check_input(type(self).__name__, x, self.width)
        B, N, _ = x.shape
        q, k, v = _qkv(self, x, self.use_bias)
        idt = common.inner_dtype(self.dtype)
        pos0 = cache["pos"] if mode == "step" else 0
        t = pos0 + jnp.arange(N)  # (N,) absolute positions
        if self.rope:
            q, k = (
                rope(q, t, self.rope_theta),
                rope(k, t, self.rope_theta),
            )
        if mode != "step":
            # in the compute dtype: cuDNN's fused attention takes bf16 (the op's XLA path
            # computes in float32 or wider whatever it is given)
            z = softmax_attn.softmax_attention(q, k, v, causal=self.causal)
            q, k, v = q.astype(idt), k.astype(idt), v.astype(idt)
            y = _out(self, z, self.use_bias)
            if mode == "call":
                return y, {}
            if N > self.cache_size:
                raise ValueError(
                    f"prefill: {N} tokens do not fit the KV cache of cache_size={self.cache_size}; "
                    f"raise cache_size"
                )
            cache = self._empty(B, idt)
            cache["k"] = cache["k"].at[:, :, :N].set(k)
            cache["v"] = cache["v"].at[:, :, :N].set(v)
            cache["pos"] = jnp.asarray(N, jnp.int32)
            return y, {}, cache
        # one token: attend to the cached positions < pos and to itself, then write k, v at pos.
        # Reading the cache before the write halves the copies XLA:CPU makes of it in a decode
        # loop (the write feeds only the returned cache).
        q, k, v = q.astype(idt), k.astype(idt), v.astype(idt)
        pos, L = cache["pos"], cache["k"].shape[2]
        root = jnp.sqrt(jnp.asarray(q.shape[-1], idt))
        s = jnp.einsum("bhqd,bhkd->bhqk", q, cache["k"].astype(idt)) / root  # (B, H, 1, L)
        # a full cache (pos ≥ L) overwrites slot L − 1, as the write below clamps
        s = jnp.where(jnp.arange(L) < jnp.minimum(pos, L - 1), s, -jnp.inf)
        s_t = jnp.einsum("bhqd,bhqd->bhq", q, k)[..., None] / root  # (B, H, 1, 1): itself
        top = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), s_t)
        p, p_t = jnp.exp(s - top), jnp.exp(s_t - top)
        z = (jnp.einsum("bhqk,bhkd->bhqd", p, cache["v"].astype(idt)) + p_t * v) / (
            jnp.sum(p, axis=-1, keepdims=True) + p_t)  # (B, H, 1, d)
        K = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, axis=2)
        V = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, axis=2)
        return _out(self, z, self.use_bias), {"k": K, "v": V, "pos": pos + 1}

    def _empty(self, batch_size, dtype, max_len=None):
        d = self.width // self.num_heads
        shape = (batch_size, self.num_heads, max_len or self.cache_size, d)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "pos": jnp.zeros((), jnp.int32),
        }

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {})."""
        del ttt_lr_mult, train
        return self._run("call", x)

    def init_cache(self, batch_size: int, dtype=None, max_len: int | None = None):
        """Empty KV cache {"k", "v": (B, H, L, d), "pos": int32}, L = max_len or cache_size."""
        if not self.causal:
            _no_decode(self)
        return self._empty(batch_size, common.inner_dtype(dtype or self.dtype), max_len)

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y, {}, cache holding the N keys/values)."""
        del ttt_lr_mult
        if not self.causal:
            _no_decode(self)
        return self._run("prefill", x)

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        del ttt_lr_mult
        if not self.causal:
            _no_decode(self)
        checks.check_step(type(self).__name__, x_t, cache, ("k", "v", "pos"), self.width)
        return self._run("step", x_t, cache)


class LinearAttention(nn.Module):
    """Multi-head linear attention z_t = Σ_s v_s φ(k_s)·φ(q_t) [/ normaliser] (E1/E3).

    Attributes: width, num_heads; causal; feature_map (None | "elu": elu + 1); normalize (None |
    "adaptive" | "constant", see `ttt.ops.linear_attn.linear_attention`); form ("chunked" |
    "cumsum" | "quadratic") and chunk for the causal op; use_bias; init_scale; dtype; param_dtype.
    """

    width: int
    num_heads: int
    causal: bool = True
    feature_map: str | None = None
    normalize: str | None = None
    form: str = "chunked"
    chunk: int = 64
    use_bias: bool = False
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=False)
        checks.check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        checks.check_choice("normalize", self.normalize, NORMALIZERS)
        checks.check_choice("form", self.form, ("chunked", "cumsum", "quadratic"))
        super().__post_init__()

    @nn.compact
    def _run(self, mode, x, cache=None):
        checks.check_input(type(self).__name__, x, self.width)
        q, k, v = _qkv(self, x, self.use_bias)
        idt = common.inner_dtype(self.dtype)
        q, k, v = q.astype(idt), k.astype(idt), v.astype(idt)
        if mode == "step":
            state = {"S": cache["S"], "s": cache["s"]}
            z, state = linear_attn.linear_attention_decode_step(
                state,
                q[:, :, 0],
                k[:, :, 0],
                v[:, :, 0],
                feature_map=self.feature_map,
                normalize=self.normalize,
                position=cache["pos"],
            )
            return _out(self, z[:, :, None], self.use_bias), dict(state, pos=cache["pos"] + 1)
        z = linear_attn.linear_attention(
            q,
            k,
            v,
            causal=self.causal,
            feature_map=self.feature_map,
            normalize=self.normalize,
            form=self.form,
            chunk=self.chunk,
        )
        y = _out(self, z, self.use_bias)
        if mode == "call":
            return y, {}
        fk = jax.nn.elu(k) + 1.0 if self.feature_map == "elu" else k
        cache = {
            "S": jnp.einsum("bhnd,bhnv->bhdv", fk, v),  # (B, H, d, dv)
            "s": fk.sum(axis=2),  # (B, H, d)
            "pos": jnp.asarray(x.shape[1], jnp.int32),
        }
        return y, {}, cache

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {})."""
        del ttt_lr_mult, train
        return self._run("call", x)

    def init_cache(self, batch_size: int, dtype=None):
        """Zero state {"S": (B, H, d, d), "s": (B, H, d), "pos": int32}."""
        if not self.causal:
            _no_decode(self)
        d = self.width // self.num_heads
        state = linear_attn.linear_attention_init_state(
            batch_size, self.num_heads, d, d, common.inner_dtype(dtype or self.dtype)
        )
        return dict(state, pos=jnp.zeros((), jnp.int32))

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y, {}, state after the N tokens)."""
        del ttt_lr_mult
        if not self.causal:
            _no_decode(self)
        return self._run("prefill", x)

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        del ttt_lr_mult
        if not self.causal:
            _no_decode(self)
        checks.check_step(type(self).__name__, x_t, cache, ("S", "s", "pos"), self.width)
        return self._run("step", x_t, cache)
