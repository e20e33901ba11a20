"""The MTTT sequence mixer (Sun et al. 2023, "Learning to (Learn at Test Time)"), docs/design.md §9.

Non-causal: per head the inner model f(·; W) takes T gradient steps on reconstructing every token x
(full width C) from φ_h(x) through a decoder, then answers ψ_h(x):

    r_i = [LN_h](f(φ_h(x_i); W) G_h + g_bias),  L(W; S) = Σ_{i∈S} ‖r_i − x_i‖² / (2 |S| d_h),
    W_t = W_{t−1} − η_t ∇L(W_{t−1}; S_t),       y = Σ_h f(ψ_h(x); W_T) H_h + h_bias.

Notable choices:
- Parameter names follow the official mttt code (psi, phi, g, g_bias, h, h_bias, inner_Dense_l,
  decoder_LN) so its checkpoints map by name; W0 is a parameter only when learned (learn_W0,
  default: learned for the MLP, frozen at zero for the linear learner, as in the paper).
- T is any number of steps (a scan in `ttt.ops.mttt`; the official code caps T at 4); T = 0 gives
  f(ψ(x); W0). "sgd" draws one permutation per (sequence, head) from the "inner" RNG stream when
  train=True and uses a fixed key in evaluation, so eval is deterministic.
- aux["inner_losses"]: (T + 1,) full-set inner loss at W_0..W_T, mean over batch and heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, inner_opt, learners
from ttt.ops import mttt as mttt_ops
from ttt.ops.primitives import layer_norm

LEARNERS = ("linear", "mlp")  # the shipped learners (`ttt.ops.learner_names()`: all)
MODES = ("gd", "sgd")
EVAL_KEY_SEED = 0


def _fan_in():
    return nn.initializers.variance_scaling(1.0, "fan_in", "uniform", batch_axis=(0,))


def _fan_out():
    return nn.initializers.variance_scaling(1.0, "fan_out", "uniform", batch_axis=(0,))


class MTTTMixer(nn.Module):
    """MTTT layer: (B, N, C) -> (B, N, C) and aux["inner_losses"] (T + 1,). Non-causal.

    Attributes: width, num_heads (d_h = C / H); learner "linear" (u W0 + b0) or "mlp"
    (gelu_tanh(u W0 + b0) W1 + b1, hidden mlp_factor·d_h), a name added by
    `ttt.ops.register_learner` or a `ttt.ops.Learner`; learn_W0 (None = learned unless the
    learner is "linear", which starts at zero); inner_bias; steps T; lrs (T learning rates,
    default all 1.0); mode "gd" or "sgd"; decoder_ln (per-head LayerNorm over C in the decoder);
    inner_opt: None (GD) or an inner optimizer "sgd" | "momentum" | "muon" | "adam" with
    inner_beta (`ttt.ops.inner_opt.make`; the steps then add η_t times its update); dtype;
    param_dtype.
    """

    width: int
    num_heads: int
    learner: str | learners.Learner = "linear"
    learn_W0: bool | None = None
    inner_bias: bool = True
    steps: int = 1
    lrs: tuple | None = None
    mode: str = "gd"
    decoder_ln: bool = True
    mlp_factor: int = 4
    inner_opt: str | None = None
    inner_beta: float = 0.9
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=False)
        self.make_learner()  # an unknown learner name fails here, in one line
        checks.check_choice("mode", self.mode, MODES)
        checks.check_choice("inner_opt", self.inner_opt, (None, *inner_opt.OPTIMIZERS))
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise ValueError(f"steps: expected an int >= 0 (T), got {self.steps!r}")
        if self.lrs is not None and len(self.lrs) != self.steps:
            raise ValueError(
                f"lrs: expected {self.steps} learning rates (one per step), got {self.lrs!r}"
            )
        if self.learner == "mlp" and self.learn_W0 is False:
            raise ValueError(
                "learn_W0=False (W0 = 0) gives an MLP inner model zero gradients; "
                "use learner='linear'"
            )
        super().__post_init__()

    @nn.nowrap
    def make_learner(self) -> learners.Learner:
        """The inner model as a pure `ttt.ops.learners.Learner` (d_h -> d_h)."""
        return learners.build_learner(self.learner, bias=self.inner_bias, init_scale=0.02,
                                      mlp_factor=self.mlp_factor)

    @nn.compact
    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {"inner_losses": (T + 1,)}); `ttt_lr_mult` scales η_t."""
        checks.check_input(type(self).__name__, x, self.width)
        C, H = self.width, self.num_heads
        dh = C // H
        pdt, dt = self.param_dtype, self.dtype
        idt = common.inner_dtype(dt)
        group = lambda name, specs: common.ParamGroup(specs, pdt, name=name)()
        zeros, ones = nn.initializers.zeros, nn.initializers.ones
        psi = group("psi", (("kernel", _fan_in(), (H, C, dh)), ("bias", zeros, (H, dh))))
        phi = group("phi", (("kernel", _fan_in(), (H, C, dh)), ("bias", zeros, (H, dh))))
        g = group("g", (("kernel", _fan_out(), (H, dh, C)),))
        g_bias = self.param("g_bias", zeros, (1, C), pdt)
        h = group("h", (("kernel", _fan_out(), (H, dh, C)),))
        h_bias = self.param("h_bias", zeros, (1, C), pdt)

        learner = self.make_learner()
        W0 = self._initial_state(learner, dh, idt)
        x = x.astype(dt)
        # (B, N, C) x (H, C, dh) -> (B, H, N, dh)
        q = (
            jnp.einsum("bnc,hcd->bhnd", x, psi["kernel"].astype(dt))
            + psi["bias"].astype(dt)[:, None]
        )
        k = (
            jnp.einsum("bnc,hcd->bhnd", x, phi["kernel"].astype(dt))
            + phi["bias"].astype(dt)[:, None]
        )
        B, N, _ = x.shape
        v = jnp.broadcast_to(x[:, None], (B, H, N, C)).astype(idt)  # target: the token itself
        decode_params = {"g": g["kernel"], "g_bias": jnp.broadcast_to(g_bias, (H, C))}
        if self.decoder_ln:
            decode_params.update(
                group("decoder_LN", (("scale", ones, (H, C)), ("bias", zeros, (H, C))))
            )
        decode_params = jax.tree_util.tree_map(lambda p: p.astype(idt), decode_params)

        def decode(y, p):  # (m, dh) -> (m, C)
            r = y @ p["g"] + p["g_bias"]  # (m, dh) @ (dh, C) -> (m, C)
            return layer_norm(r, p["scale"], p["bias"]) if self.decoder_ln else r

        lrs = jnp.asarray(self.lrs if self.lrs is not None else (1.0,) * self.steps, idt)
        lrs = lrs * jnp.asarray(ttt_lr_mult, idt)
        z, _, losses = mttt_ops.mttt(
            learner,
            W0,
            q.astype(idt),
            k.astype(idt),
            v,
            lrs,
            decode=decode,
            decode_params=decode_params,
            mode=self.mode,
            key=self._key(train),
            loss_norm=float(dh),
            inner_opt=None if self.inner_opt is None else inner_opt.make(self.inner_opt,
                                                                         beta=self.inner_beta),
        )
        # (B, H, N, dh) x (H, dh, C) -> (B, N, C): per-head outputs summed over heads
        y = jnp.einsum("bhnd,hdc->bnc", z.astype(dt), h["kernel"].astype(dt)) + h_bias.astype(dt)
        return y, {"inner_losses": jnp.mean(losses.astype(jnp.float32), axis=(0, 1))}

    def _initial_state(self, learner, dh, idt):
        """W0 with leading H: parameters inner_Dense_l/{kernel,bias}, or zeros when frozen."""
        learn = self.learner != "linear" if self.learn_W0 is None else self.learn_W0
        if learner.dense is None:
            return common.inner_tree(self, learner, dh, self.num_heads, learn, idt)

        def make(l, kernel_shape, bias_shape):
            specs = [("kernel", nn.initializers.xavier_uniform(batch_axis=(0,)), kernel_shape)]
            if bias_shape is not None:
                specs.append(("bias", nn.initializers.zeros, bias_shape))
            p = common.ParamGroup(tuple(specs), self.param_dtype, name=f"inner_Dense_{l}")()
            return p["kernel"], p.get("bias")

        W0 = common.inner_weights(learner, dh, self.num_heads, make if learn else None, idt)
        return jax.tree_util.tree_map(lambda w: w.astype(idt), W0)

    def _key(self, train):
        if self.mode != "sgd" or self.steps == 0:
            return None
        if not train:
            return jax.random.PRNGKey(EVAL_KEY_SEED)
        if not self.has_rng("inner"):
            raise ValueError(
                'MTTTMixer(mode="sgd") in training needs an "inner" RNG stream: '
                'apply(..., train=True, rngs={"inner": key})'
            )
        return self.make_rng("inner")
