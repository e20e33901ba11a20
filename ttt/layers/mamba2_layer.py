"""The Mamba2 mixer (Dao & Gu 2024, arXiv 2405.21060, §7 / the reference `Mamba2Simple`): a
selective state-space layer whose scan is linear attention with a per-token, per-head decay.

    z, x, B, C, dt = x_in W_in                 (E = expand·width for z and x; B, C of d_state)
    x, B, C = SiLU(causal depthwise conv_4(x, B, C))
    Δ_t = softplus(dt_t + dt_bias)             (per head)
    A = −exp(A_log)                            (per head)
    S_t = exp(Δ_t A) S_{t−1} + B_t (Δ_t x_t)ᵀ, y_t = S_tᵀ C_t + D x_t   (per head of P = head_dim)
    out = RMSNorm(y ⊙ SiLU(z)) W_out

The scan is `ttt.ops.linear_attn.linear_attention` with q = C, k = B, v = Δ·x, no feature map, no
normaliser and log_alpha = Δ·A (the SSD "dual" of the paper: chunked, cumsum or quadratic form).

Notable choices:
- One group (ngroups = 1): B and C are shared by all heads and broadcast to them for the op.
- The head count is E / P, not the model's `num_heads` (Mamba2 has no attention heads); a layer
  narrower than one head (E < head_dim) runs one head of width E, so tiny test models build with
  the paper's defaults (d_state 128, head_dim 64, expand 2, conv width 4).
- Initialisation as the reference: Δ = softplus(dt_bias) log-uniform in [dt_min, dt_max] (floored
  at 1e-4), A uniform in [1, 16] (stored as A_log), D = 1, gated-norm weight 1; the projections
  N(0, init_scale²) like the other mixers of the package (the reference: PyTorch's default).
- Decode cache: the convolution's last conv_width − 1 inputs and S per head (B, heads, d_state,
  P); `ttt_lr_mult` is accepted and ignored (nothing here is a test-time learning rate).
- The scan runs in float32 (float64 when the layer computes in float64) whatever `dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, linear_attn
from ttt.ops.primitives import rms_norm

FORMS = ("chunked", "cumsum", "quadratic")
A_INIT_RANGE = (1.0, 16.0)
DT_FLOOR = 1e-4


def _dt_bias_init(dt_min: float, dt_max: float):
    """dt_bias = softplus⁻¹(Δ), Δ log-uniform in [dt_min, dt_max], at least DT_FLOOR."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, DT_FLOOR)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(key, shape, dtype=jnp.float32):
    """A_log = log A, A uniform in A_INIT_RANGE (so A = −exp(A_log) ∈ [−16, −1])."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)).astype(dtype)


def _gated_rms_norm(y, z, scale, eps):
    """RMSNorm(y ⊙ SiLU(z)) · scale over the last axis (the reference's norm_before_gate=False)."""
    return rms_norm(y * jax.nn.silu(z), scale, eps)


def final_state(k, v, log_alpha):
    """S_N = Σ_s exp(g_N − g_s) k_s v_sᵀ, g = cumsum(log_alpha): the decayed state after N tokens.

    k (B, H, N, d), v (B, H, N, dv), log_alpha (B, H, N) -> (B, H, d, dv).
    """
    g = jnp.cumsum(log_alpha, axis=-1)  # (B, H, N)
    w = jnp.exp(g[..., -1:] - g)  # (B, H, N): decay from token s to the end, ≤ 1
    return jnp.einsum("bhn,bhnd,bhnv->bhdv", w, k, v)


class Mamba2Mixer(nn.Module):
    """Mamba2 sequence mixer: (B, N, C) -> (B, N, C), with a constant-size decode cache.

    width C; num_heads (accepted for the mixer interface, unused: heads = expand·C / head_dim);
    d_state N_s (B and C per token); head_dim P; expand (E = expand·C); conv_width; form and
    chunk of the scan (`linear_attention`); dt_min, dt_max (the range of Δ at init); norm_eps of
    the gated RMSNorm; init_scale of the projections; dtype; param_dtype.
    """

    width: int
    num_heads: int
    d_state: int = 128
    head_dim: int = 64
    expand: int = 2
    conv_width: int = 4
    form: str = "chunked"
    chunk: int = 64
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    norm_eps: float = 1e-5
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        owner = type(self).__name__
        for name, minimum in (("width", 1), ("d_state", 1), ("head_dim", 1), ("expand", 1),
                              ("conv_width", 1), ("chunk", 1)):
            checks.check_int(name, getattr(self, name), minimum)
        checks.check_choice("form", self.form, FORMS)
        if not (0 < self.dt_min <= self.dt_max):
            raise ValueError(f"{owner}: expected 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                             f"dt_max={self.dt_max}")
        if self.inner % self.head:
            raise ValueError(f"{owner}: expand·width = {self.inner} is not a multiple of "
                             f"head_dim {self.head_dim}; choose a head_dim that divides it")
        super().__post_init__()

    @property
    def inner(self) -> int:
        """E = expand · width: the width of x and z."""
        return self.expand * self.width

    @property
    def head(self) -> int:
        """P: head_dim, or E when the layer is narrower than one head."""
        return min(self.head_dim, self.inner)

    @property
    def heads(self) -> int:
        return self.inner // self.head

    @property
    def conv_features(self) -> int:
        """Channels of the convolution: x, B and C."""
        return self.inner + 2 * self.d_state

    @nn.compact
    def _run(self, mode, x, cache=None):
        checks.check_input(type(self).__name__, x, self.width)
        cdt, pdt = self.dtype, self.param_dtype  # compute and parameter dtypes
        idt = common.inner_dtype(cdt)
        E, Ns, H = self.inner, self.d_state, self.heads
        zxbcdt = common.dense(2 * E + 2 * Ns + H, "in_proj", cdt, pdt, self.init_scale)(
            x.astype(cdt))  # (B, N, 2E + 2N_s + H)
        z, xbc, dt_raw = jnp.split(zxbcdt, [E, 2 * E + 2 * Ns], axis=-1)
        conv = common.CausalConv(self.conv_features, self.conv_width, cdt, pdt, name="conv1d")
        xbc, tail = conv(xbc, None if cache is None else cache["conv"])
        xbc = jax.nn.silu(xbc.astype(idt))
        xs, Bs, Cs = jnp.split(xbc, [E, E + Ns], axis=-1)  # (B, N, E), (B, N, N_s) twice
        dt_bias = self.param("dt_bias", _dt_bias_init(self.dt_min, self.dt_max), (H,), pdt)
        A_log = self.param("A_log", _a_log_init, (H,), pdt)
        D = self.param("D", nn.initializers.ones, (H,), pdt)
        scale = self.param("norm_scale", nn.initializers.ones, (E,), pdt)

        delta = jax.nn.softplus(dt_raw.astype(idt) + dt_bias.astype(idt))  # (B, N, H)
        log_alpha = jnp.moveaxis(delta * -jnp.exp(A_log.astype(idt)), 1, 2)  # (B, H, N) ≤ 0
        xh = common.split_heads(xs, H)  # (B, H, N, P)
        v = xh * jnp.moveaxis(delta, 1, 2)[..., None]  # (B, H, N, P): Δ·x
        B_, N_ = Bs.shape[:2]
        k = jnp.broadcast_to(Bs[:, None], (B_, H, N_, Ns))  # (B, H, N, N_s): one group
        q = jnp.broadcast_to(Cs[:, None], (B_, H, N_, Ns))
        if mode == "step":  # the op's normaliser sum s is not needed (no normaliser): zeros
            y, state = linear_attn.linear_attention_decode_step(
                {"S": cache["S"], "s": jnp.zeros((B_, H, Ns), idt)}, q[:, :, 0], k[:, :, 0],
                v[:, :, 0], log_alpha_t=log_alpha[:, :, 0])
            y, S = y[:, :, None], state["S"]  # (B, H, 1, P)
        else:
            y = linear_attn.linear_attention(q, k, v, causal=True, form=self.form,
                                             chunk=self.chunk, log_alpha=log_alpha)
            S = final_state(k, v, log_alpha) if mode == "prefill" else None
        y = y + xh * D.astype(idt)[:, None, None]  # (B, H, N, P): the skip D·x
        y = _gated_rms_norm(common.merge_heads(y), z.astype(idt), scale.astype(idt),
                            self.norm_eps)  # (B, N, E)
        out = common.dense(self.width, "out_proj", cdt, pdt, self.init_scale)(y.astype(cdt))
        if mode == "call":
            return out, {}
        return out, {"conv": tail, "S": S}

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {})."""
        del ttt_lr_mult, train
        return self._run("call", x)

    def init_cache(self, batch_size: int, dtype=None):
        """Zero cache {"conv": (B, conv_width − 1, E + 2 d_state), "S": (B, heads, d_state, P)}."""
        return {"conv": jnp.zeros((batch_size, self.conv_width - 1, self.conv_features),
                                  self.dtype),
                "S": jnp.zeros((batch_size, self.heads, self.d_state, self.head),
                               common.inner_dtype(dtype or self.dtype))}

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), {}, cache after the N tokens)."""
        del ttt_lr_mult
        y, cache = self._run("prefill", x)
        return y, {}, cache

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        del ttt_lr_mult
        checks.check_step(type(self).__name__, x_t, cache, ("conv", "S"), self.width)
        return self._run("step", x_t, cache)
