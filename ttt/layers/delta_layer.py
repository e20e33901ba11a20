"""DeltaNet and Gated DeltaNet as one sequence mixer (Yang et al. 2024, arXiv 2406.06484; Yang
et al. 2025, arXiv 2412.06464), around the delta rule of `ttt.ops.delta`.

Per head h of d = C / H key channels and d_v = expand_v · d value channels:
    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))    (depthwise, causal)
    q ← L2(q) / √d,  k ← L2(k)                                          (per head)
    β_t = sigmoid(x_t W_β) · ttt_lr_mult                                 (write strength)
    log a_t = −exp(A_log) · softplus(x_t W_a + dt_bias)                  (gate=True only)
    S_t = a_t S_{t−1} + β_t k_t (v_t − a_t S_{t−1}ᵀ k_t)ᵀ,  o_t = S_tᵀ q_t  (a_t = 1 ungated)
    y = [RMSNorm_h(o) ⊙ SiLU(x W_g)] W_o

Notable choices (conventions pinned to fla's DeltaNet / GatedDeltaNet layers):
- q is scaled by d^−1/2 after the L2 norm (the kernels' default scale); L2 divides by
  √(Σ x² + 1e-6), the output RMSNorm (one scale of d_v shared by the heads) has eps 1e-5.
- The output gate SiLU(x W_g) is always on (GatedDeltaNet's default; DeltaNet's option).
- Convolutions have no bias; kernels U(±1/√conv_width) (PyTorch's Conv1d default). Projections
  are N(0, init_scale²) like every mixer here. A_log = log U(0, 16) (floored at 1e-4), dt_bias =
  softplus⁻¹(dt) with dt log-uniform in [1e-3, 0.1] (floored at 1e-4), as fla.
- β is the inner step size of this TTT view (one gradient step on ½‖Sᵀk − v‖² per token), so
  `ttt_lr_mult` scales it, as it scales η in the TTT layers.
- form "chunked" (default) runs `delta.delta_rule`; "recurrent" its token-by-token twin
  `delta.delta_rule_recurrent` (same results; the reference the tests hold the fast form to).
- The three convolutions run as one over the concatenated q, k, v channels: the decode cache is
  {"conv": the last conv_width − 1 projected inputs (B, w − 1, 2C + H d_v), "S": (B, H, d, d_v)},
  constant in the context length.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, delta
from ttt.ops.primitives import causal_conv, l2_normalize, project, rms_norm

L2_EPS = 1e-6
NORM_EPS = 1e-5
FORMS = ("chunked", "recurrent")


def _l2(x):
    """x / √(Σ x² + eps) over the last axis."""
    return l2_normalize(x, L2_EPS)


def _rms_norm(x, scale):
    """x / √(mean x² + eps) · scale over the last axis."""
    return rms_norm(x, scale, NORM_EPS)


def _a_log_init(key, shape, dtype):
    """log A, A ~ U(0, 16) per head (floored: log 0 would be −inf)."""
    return jnp.log(jnp.maximum(jax.random.uniform(key, shape, jnp.float32, 0.0, 16.0), 1e-4)
                   ).astype(dtype)


def _dt_bias_init(key, shape, dtype):
    """softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1] per head (floored at 1e-4)."""
    lo, hi = math.log(1e-3), math.log(0.1)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class DeltaNetMixer(nn.Module):
    """DeltaNet (gate=False) or Gated DeltaNet (gate=True): (B, N, C) -> (B, N, C), causal, with
    a constant-size decode cache.

    width, num_heads: C and H (key head dim d = C / H); expand_v: value head dim / d (d_v);
    gate: the decay gate a_t (Gated DeltaNet); form: "chunked" | "recurrent"; chunk: tokens per
    chunk of the chunked form; conv_width: taps of the short convolutions; init_scale; dtype;
    param_dtype.
    """

    width: int
    num_heads: int
    gate: bool = False
    expand_v: float = 1
    form: str = "chunked"
    chunk: int = 64
    conv_width: int = 4
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        owner = type(self).__name__
        d = checks.check_heads(owner, self.width, self.num_heads, even_head_dim=False)
        if not (isinstance(self.expand_v, int | float) and self.expand_v > 0
                and float(self.expand_v * d).is_integer()):
            raise ValueError(f"expand_v: expected a positive number with expand_v · head dim "
                             f"({d}) an integer, got {self.expand_v!r}")
        checks.check_choice("form", self.form, FORMS)
        checks.check_int("chunk", self.chunk, 1)
        checks.check_int("conv_width", self.conv_width, 1)
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def value_dim(self) -> int:
        """d_v, the value head dim."""
        return int(self.expand_v * self.head_dim)

    @property
    def conv_channels(self) -> int:
        """Channels of the q, k, v convolutions together: 2C + H d_v."""
        return 2 * self.width + self.num_heads * self.value_dim

    # ------------------------------------------------------------------ parameters

    @nn.compact
    def _params(self) -> dict:
        C, H, pdt = self.width, self.num_heads, self.param_dtype
        Cv, w = H * self.value_dim, self.conv_width
        normal = nn.initializers.normal(self.init_scale)
        conv_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # U(±1/√w)
        kernel = lambda name, shape, init=normal: common.ParamGroup(
            (("kernel", init, shape),), pdt, name=name)()["kernel"]
        p = {"wq": kernel("wq", (C, C)), "wk": kernel("wk", (C, C)), "wv": kernel("wv", (C, Cv)),
             "wb": kernel("b_proj", (C, H)), "wg": kernel("g_proj", (C, Cv)),
             "wo": kernel("wo", (Cv, C)),
             "conv": jnp.concatenate([kernel("conv_q", (w, C), conv_init),
                                      kernel("conv_k", (w, C), conv_init),
                                      kernel("conv_v", (w, Cv), conv_init)], axis=1),
             "o_norm": self.param("o_norm", nn.initializers.ones, (self.value_dim,), pdt)}
        if self.gate:
            p["wa"] = kernel("a_proj", (C, H))
            p["A_log"] = self.param("A_log", _a_log_init, (H,), pdt)
            p["dt_bias"] = self.param("dt_bias", _dt_bias_init, (H,), pdt)
        return p

    # ------------------------------------------------------------------ pure pieces

    @nn.nowrap
    def _inputs(self, p, x, ttt_lr_mult, tail=None):
        """x (B, N, C) -> q, k (B, H, N, d), v (B, H, N, d_v), β, log a (B, H, N) or None, the
        output gate's pre-activation g (B, N, H d_v) and the new conv tail (B, w − 1, 2C + H d_v).

        Two products in all: x [W_q W_k W_v] in `dtype`, x [W_β (W_a) W_g] in the inner dtype
        (one (M, C) @ (C, F) product each: XLA:CPU runs one wide product faster than several
        narrow ones and their concatenation)."""
        dt, C, H = self.dtype, self.width, self.num_heads
        idt = common.inner_dtype(dt)
        x = x.astype(dt)
        w_qkv = jnp.concatenate([p[n].astype(dt) for n in ("wq", "wk", "wv")], axis=1)
        qkv = project(x, w_qkv)  # (B, N, 2C + H d_v)
        qkv, tail = causal_conv(qkv, p["conv"].astype(dt), None, tail)  # (B, N, 2C + H d_v)
        qkv = jax.nn.silu(qkv.astype(idt))
        q, k, v = (common.split_heads(y, H) for y in jnp.split(qkv, [C, 2 * C], axis=-1))
        q = _l2(q) / math.sqrt(self.head_dim)  # (B, H, N, d)
        k = _l2(k)
        names = ("wb", "wa", "wg") if self.gate else ("wb", "wg")
        small = project(x.astype(idt), jnp.concatenate([p[n].astype(idt) for n in names], 1))
        heads = lambda y: jnp.moveaxis(y, 1, 2)  # (B, N, H) -> (B, H, N)
        beta = heads(jax.nn.sigmoid(small[..., :H]))
        beta = beta * jnp.asarray(ttt_lr_mult, idt)
        log_a = None
        if self.gate:
            rate = jax.nn.softplus(small[..., H:2 * H] + p["dt_bias"].astype(idt))
            log_a = heads(-jnp.exp(p["A_log"].astype(idt)) * rate)  # (B, H, N), <= 0
        g = small[..., (2 if self.gate else 1) * H:]  # (B, N, H d_v)
        return q, k, v, beta, log_a, g, tail

    @nn.nowrap
    def _output(self, p, g, o):
        """o (B, H, N, d_v), the gate's pre-activation g (B, N, H d_v) -> y (B, N, C): per-head
        RMSNorm, the SiLU output gate, W_o."""
        dt, idt = self.dtype, common.inner_dtype(self.dtype)
        g = common.split_heads(g, self.num_heads)
        z = _rms_norm(o.astype(idt), p["o_norm"].astype(idt)) * jax.nn.silu(g)
        return project(common.merge_heads(z).astype(dt), p["wo"].astype(dt))

    @nn.nowrap
    def _sequence(self, x, ttt_lr_mult):
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        q, k, v, beta, log_a, g, tail = self._inputs(p, x, ttt_lr_mult)
        if self.form == "chunked":
            o, S = delta.delta_rule(q, k, v, beta, log_alpha=log_a, chunk=self.chunk)
        else:
            o, S = delta.delta_rule_recurrent(q, k, v, beta, log_alpha=log_a)
        return self._output(p, g, o), {"conv": tail.astype(self.dtype), "S": S}

    # ------------------------------------------------------------------ public interface

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {}). `ttt_lr_mult` scales β."""
        del train
        return self._sequence(x, ttt_lr_mult)[0], {}

    def init_cache(self, batch_size: int, dtype=None):
        """Empty decode cache {"conv": (B, w − 1, 2C + H d_v), "S": (B, H, d, d_v)}."""
        dt = dtype or self.dtype
        return {"conv": jnp.zeros((batch_size, self.conv_width - 1, self.conv_channels), dt),
                "S": jnp.zeros((batch_size, self.num_heads, self.head_dim, self.value_dim),
                               common.inner_dtype(dt))}

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), {}, cache after the N tokens)."""
        y, cache = self._sequence(x, ttt_lr_mult)
        return y, {}, cache

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        checks.check_step(type(self).__name__, x_t, cache, ("conv", "S"), self.width,
                          batch_key="S")
        p = self._params()
        q, k, v, beta, log_a, g, tail = self._inputs(p, x_t, ttt_lr_mult, cache["conv"])
        first = lambda y: None if y is None else y[:, :, 0]  # (B, H, 1, ...) -> (B, H, ...)
        o_t, S = delta.delta_rule_decode_step(cache["S"], first(q), first(k), first(v),
                                              first(beta), first(log_a))
        return self._output(p, g, o_t[:, :, None]), {"conv": tail.astype(cache["conv"].dtype),
                                                        "S": S}
