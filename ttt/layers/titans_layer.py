"""The Titans memory as a layer (Behrouz et al. 2024, arXiv 2501.00663 §4.3 "LMM", §4.4): a
causal mixer whose state is a per-head MLP trained at test time with momentum and forgetting
(`ttt.ops.titans` has the update and its chunk form).

    q, k, v = SiLU(conv(x W_q)), SiLU(conv(x W_k)), SiLU(conv(x W_v))   (depthwise, causal, width 4)
    q, k ← q / ‖q‖, k / ‖k‖ per head
    θ_t = base_lr · σ(x_t W_θ + b_θ),  η_t = σ(x_t W_η + b_η),  α_t = σ(x_t W_α + b_α)   (per head)
    z = Titans memory (W0 learned per head; chunks of `mini_batch`; update, then read)
    y = (RMSNorm_h(z) · SiLU(x W_g)) W_o

Notable choices (the paper leaves them open):
- The memory is `ttt.ops.learners.mlp` (GELU-tanh, hidden = mlp_factor · d, default 4 as TTT-MLP;
  biases off by default) or `linear` (the paper's matrix memory). Its initial weights W0 are
  parameters, N(0, 1/fan_in) entries, biases zero.
- One depthwise convolution over the concatenated (q, k, v) projections (3C channels): one op, the
  same as three convolutions. The decode cache keeps its last conv_width − 1 inputs.
- The gates' biases start at b_θ = 0, b_η = 0, b_α = −4: θ = base_lr / 2, η = 1/2, α ≈ 0.018 at
  init, so the memory starts by keeping most of what it wrote.
- RMSNorm per head with one scale (d,) shared by the heads; `ttt_lr_mult` scales θ.
- `ln_residual=True` (off by default, as in the paper) wraps the memory as TTT-MLP's inner model,
  x + LN(MLP(x)); `momentum=False` drops η (η ≡ 0); `max_grad_norm` cuts each token's gradient
  (off by default). In the 2k LM none of them, nor a smaller θ bound, made chunks of 16 train
  at every seed (with the clip every seed stayed finite, one far behind); chunks of 1 (the token
  recurrence, what `experiments/lm.py` uses) trained at every seed (docs/results.md, "Titans in
  the 2k LM"; docs/design.md §15.5).
- The memory runs in float32 (float64 when the layer computes in float64) whatever `dtype`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, learners
from ttt.ops import titans as titans_ops
from ttt.ops._scan import default_unroll
from ttt.ops.primitives import causal_conv, l2_normalize, project, rms_norm

LEARNERS = ("mlp", "linear")
NORM_EPS = 1e-6
GATE_BIAS = {"theta": 0.0, "eta": 0.0, "alpha": -4.0}


def _l2(x):
    return l2_normalize(x, 1e-10)


def _rms_norm(x, scale):
    return rms_norm(x, scale, NORM_EPS)


class TitansMixer(nn.Module):
    """Titans' neural memory as a sequence mixer: (B, N, C) -> (B, N, C), causal, with a
    constant-size decode cache.

    width, num_heads: C and H (memory per head of d = C / H); mini_batch: tokens per chunk (1 is
    the exact token recurrence); learner "mlp" | "linear"; mlp_factor: MLP hidden / d;
    inner_bias: biases in the memory; ln_residual: the memory f(x) = x + LN(MLP(x)) (TTT-MLP's
    inner model, LN scale and bias learned per head) instead of MLP(x); momentum: False for
    η ≡ 0 (no η gate; the paper's ablation without momentum); max_grad_norm: None or τ, each
    token's memory gradient cut to length τ (`ttt.ops.titans.clipped`); base_lr: θ at σ = 1;
    conv_width; unroll: chunks per loop iteration (None: `default_unroll()`, 8 on a GPU, 1
    elsewhere); init_scale (projections); dtype, param_dtype.
    """

    width: int
    num_heads: int
    mini_batch: int = 16
    learner: str = "mlp"
    mlp_factor: int = 4
    inner_bias: bool = False
    ln_residual: bool = False
    momentum: bool = True
    max_grad_norm: float | None = None
    base_lr: float = 0.1
    conv_width: int = 4
    unroll: int | None = None
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=False)
        checks.check_int("mini_batch", self.mini_batch, 1)
        checks.check_choice("learner", self.learner, LEARNERS)
        checks.check_int("mlp_factor", self.mlp_factor, 1)
        checks.check_int("conv_width", self.conv_width, 1)
        if self.unroll is not None:
            checks.check_int("unroll", self.unroll, 1)
        titans_ops.check_max_grad_norm(self.max_grad_norm)
        if not (isinstance(self.base_lr, int | float) and self.base_lr > 0):
            raise ValueError(f"base_lr: expected a positive number, got {self.base_lr!r}")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @nn.nowrap
    def make_learner(self) -> learners.Learner:
        """The memory f(x; W) as a pure `ttt.ops.learners.Learner`."""
        base = learners.build_learner(self.learner, bias=self.inner_bias,
                                      mlp_factor=self.mlp_factor)
        return learners.ln_residual(base) if self.ln_residual else base

    def _unroll(self) -> int:
        return default_unroll() if self.unroll is None else self.unroll

    # ------------------------------------------------------------------ parameters

    @nn.compact
    def _params(self) -> dict:
        C, H, d, pdt = self.width, self.num_heads, self.head_dim, self.param_dtype
        normal = nn.initializers.normal(self.init_scale)
        group = lambda name, *specs: common.ParamGroup(specs, pdt, name=name)()
        kernel = lambda name: group(name, ("kernel", normal, (C, C)))["kernel"]
        shapes = jax.eval_shape(lambda key: self.make_learner().init(key, d),
                                jax.random.PRNGKey(0))

        def memory_init(name):
            shape = shapes[name].shape
            if len(shape) == 1:  # a bias
                return nn.initializers.zeros
            return nn.initializers.normal(shape[0] ** -0.5)

        p = {name: kernel(name) for name in ("wq", "wk", "wv", "wg", "wo")}
        p["conv"] = group("conv", ("kernel", nn.initializers.lecun_normal(),
                                   (self.conv_width, 1, 3 * C)),
                          ("bias", nn.initializers.zeros, (3 * C,)))
        p["memory"] = group("memory", *[(n, memory_init(n), (H, *shapes[n].shape))
                                        for n in sorted(shapes)])
        for gate, b0 in GATE_BIAS.items():
            if gate == "eta" and not self.momentum:
                continue
            p[gate] = group(f"{gate}_proj", ("kernel", normal, (C, H)),
                            ("bias", nn.initializers.constant(b0), (H,)))
        p["out_norm"] = group("out_norm", ("scale", nn.initializers.ones, (d,)))["scale"]
        if self.ln_residual:  # the memory's LN: `fixed` of the learner, (H, d) each
            p["memory_norm"] = group("memory_norm", ("scale", nn.initializers.ones, (H, d)),
                                     ("bias", nn.initializers.zeros, (H, d)))
        idt = common.inner_dtype(self.dtype)
        for name in ("memory", "memory_norm"):
            if name in p:
                p[name] = jax.tree_util.tree_map(lambda w: w.astype(idt), p[name])
        return p

    # ------------------------------------------------------------------ pure pieces

    @nn.nowrap
    def _inputs(self, p, x, ttt_lr_mult, tail=None):
        """x (B, N, C) -> q, k, v (B, H, N, d), rates θ, η, α (B, H, N), the new conv tail."""
        dt, H, idt = self.dtype, self.num_heads, common.inner_dtype(self.dtype)
        x = x.astype(dt)
        qkv = jnp.concatenate([project(x, p[n].astype(dt)) for n in ("wq", "wk", "wv")], axis=-1)
        conv = p["conv"]
        qkv, new_tail = causal_conv(qkv, conv["kernel"][:, 0, :].astype(dt),
                                           conv["bias"].astype(dt), tail)  # (B, N, 3C)
        q, k, v = (common.split_heads(y, H).astype(idt)
                   for y in jnp.split(jax.nn.silu(qkv), 3, axis=-1))  # (B, H, N, d) each
        xi = x.astype(idt)
        rate = lambda g: jnp.moveaxis(jax.nn.sigmoid(
            xi @ p[g]["kernel"].astype(idt) + p[g]["bias"].astype(idt)), 1, 2)  # (B, H, N)
        theta = rate("theta") * (self.base_lr * jnp.asarray(ttt_lr_mult, idt))
        eta = rate("eta") if self.momentum else jnp.zeros_like(theta)
        return _l2(q), _l2(k), v, (theta, eta, rate("alpha")), new_tail

    @nn.nowrap
    def _output(self, p, x, z):
        """Memory output z (B, H, N, d) -> y (B, N, C): RMSNorm per head, SiLU gate, W_o."""
        dt, idt = self.dtype, common.inner_dtype(self.dtype)
        z = _rms_norm(z, p["out_norm"].astype(idt))
        gate = jax.nn.silu(project(x.astype(dt), p["wg"].astype(dt)))  # (B, N, C)
        y = common.merge_heads(z).astype(dt) * gate
        return project(y, p["wo"].astype(dt))

    # ------------------------------------------------------------------ public interface

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {})."""
        del train
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        q, k, v, rates, _ = self._inputs(p, x, ttt_lr_mult)
        z, _, _ = titans_ops.forward(self.make_learner(), p["memory"], q, k, v, *rates,
                                     mini_batch=self.mini_batch, fixed=p.get("memory_norm"),
                                     unroll=self._unroll(), max_grad_norm=self.max_grad_norm)
        return self._output(p, x, z), {}

    def init_cache(self, batch_size: int, dtype=None):
        """The state before any token: {"W", "S", "W_start", "pos"} (`TitansState`; W = W_start
        = W0, S = 0) and "conv" (B, conv_width − 1, 3C) zeros."""
        p = self._params()
        cache = titans_ops.init_state(p["memory"], batch_size)._asdict()
        cache["conv"] = jnp.zeros((batch_size, self.conv_width - 1, 3 * self.width),
                                  dtype or self.dtype)
        return cache

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), {}, cache after the N tokens)."""
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        q, k, v, rates, tail = self._inputs(p, x, ttt_lr_mult)
        z, state = titans_ops.prefill(self.make_learner(), p["memory"], q, k, v, *rates,
                                      mini_batch=self.mini_batch, fixed=p.get("memory_norm"),
                                      unroll=self._unroll(), max_grad_norm=self.max_grad_norm)
        return self._output(p, x, z), {}, dict(state._asdict(), conv=tail)

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        keys = titans_ops.TitansState._fields + ("conv",)
        checks.check_step(type(self).__name__, x_t, cache, keys, self.width, batch_key="W")
        p = self._params()
        q, k, v, rates, tail = self._inputs(p, x_t, ttt_lr_mult, cache["conv"])
        state = titans_ops.TitansState(*(cache[f] for f in titans_ops.TitansState._fields))
        first = lambda y: y[:, :, 0]  # (B, H, 1, ...) -> (B, H, ...)
        z_t, state = titans_ops.step(self.make_learner(), state, first(q), first(k), first(v),
                                     *map(first, rates), mini_batch=self.mini_batch,
                                     fixed=p.get("memory_norm"),
                                     max_grad_norm=self.max_grad_norm)
        return self._output(p, x_t, z_t[:, :, None]), dict(state._asdict(), conv=tail)
