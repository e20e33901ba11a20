"""The TTT-LM sequence mixer: TTT-Linear or TTT-MLP, transformer or Mamba backbone (design.md §8).

One module for every variant: the learner, the backbone and each ingredient of the paper's ablation
ladder are attributes. The layer owns the parameters: projections (Mamba: a shared XQK then causal
convs), RoPE at t mod b, the learning-rate gate and token offsets (η_ij = c_i a_j), post-norm,
gate (Mamba) and output projection; the inner loop and its decode state are one call into the pure
state machine `ttt.ops.ttt_state` (forward, prefill or step).

Notable choices: parameter names follow ttt-lm-jax (official checkpoints map by name,
`ttt.interop`); every parameter is fetched first (`_params`) and the rest is a pure function of
them, so `remat_every` runs the whole layer in jax.checkpoint'ed groups (`scan_groups`); any
length works, mini_batch=0 is one mini-batch over the whole sequence; learn_eta=False makes η the
constant `eta` (default base_lr / d); the inner loop runs in float32 (float64 under float64)
whatever `dtype` is; the decode cache (state + conv tails) does not grow with the context.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, inner_opt, learners, ttt_state
from ttt.ops._scan import GPU_UNROLL, default_unroll, scan_groups  # noqa: F401 (GPU_UNROLL)
from ttt.ops.primitives import causal_conv, layer_norm, project, rope
from ttt.ops.ttt import FORMS, KERNELS

LEARNERS, BACKBONES = ("linear", "mlp"), ("transformer", "mamba")


def _a_log_init(key, shape, dtype):
    """The forget gate's A_log = log A, A ~ U(0, 16) per head floored at 1e-4 (Gated DeltaNet's
    init, as `ttt.layers.delta_layer`)."""
    A = jnp.maximum(jax.random.uniform(key, shape, jnp.float32, 0.0, 16.0), 1e-4)
    return jnp.log(A).astype(dtype)


def _dt_bias_init(key, shape, dtype):
    """softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1] per head (floored at 1e-4), as Gated
    DeltaNet: the gate's softplus starts in [1e-3, 0.1]."""
    lo, hi = jnp.log(1e-3), jnp.log(0.1)
    dt = jnp.maximum(jnp.exp(jax.random.uniform(key, shape, jnp.float32, lo, hi)), 1e-4)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus⁻¹(dt) = dt + log(1 − e^−dt)


class TTTMixer(nn.Module):
    """TTT-LM sequence mixer: (B, N, C) -> (B, N, C), with a constant-size decode cache.

    Defaults are TTT-Linear on the transformer backbone, as in ttt-lm-jax. width, num_heads: C, H
    (d = C / H); learner "linear" | "mlp" (hidden mlp_factor·d), a name added by
    `ttt.ops.register_learner` or a `ttt.ops.Learner` (a dense chain runs the dual form, any other
    learner the primal form); backbone "transformer" | "mamba"
    (convs of conv_width, output gate); mini_batch b (0 = the whole sequence); base_lr (1.0
    Linear, 0.1 MLP); learn_eta (token offsets + per-head gate), else the constant eta; learn_W0
    (else W0 = 0) and inner_bias (default: learn_W0); ln_residual: f(x) = x + LN(f_res(x)); rope,
    rope_theta; post_norm; form "auto" | "dual" | "primal"; kernel "auto" | "xla" | "pallas" (the
    dual form's fused kernel; auto: only on a backend where it was validated on hardware, see
    `ttt.ops.kernels.ttt_dual.VALIDATED_BACKENDS`); remat_every: run the layer in
    checkpointed groups of that many mini-batches (one group's activations and one state per group
    in memory, for a second forward in the backward); unroll: mini-batch steps per loop iteration
    (None: `default_unroll()`, 8 on a GPU, 1 elsewhere); stats: inner-loss diagnostics in aux (an
    extra no-grad pass; plain GD only); inner_opt: None (mini-batch GD: the dual/primal fast paths)
    or "sgd" | "momentum" | "muon" | "adam" with inner_beta (the generic `ttt.ops.inner_opt`, its
    state in the decode cache); init_scale; inner_out_init_scale: std of the last inner layer
    (ttt-lm-jax: init_scale / sqrt(2 · layers) for TTT-MLP); dtype (compute), param_dtype.
    gate: a learned per-head forget gate (docs/design.md §4.11), Gated DeltaNet's decay
    log a_t = −exp(A_log_h) · softplus(x_t W_a + dt_bias_h) applied to the whole inner W before
    each token (params "forget_gate": kernel (C, H), A_log, dt_bias (H,); plain GD only, not the
    fused kernel); gate=False creates no parameter of it.
    """

    width: int
    num_heads: int
    learner: str | learners.Learner = "linear"
    backbone: str = "transformer"
    mini_batch: int = 16
    base_lr: float = 1.0
    learn_eta: bool = True
    eta: float | None = None
    learn_W0: bool = True
    inner_bias: bool | None = None
    ln_residual: bool = True
    rope: bool = True
    rope_theta: float = 10000.0
    post_norm: bool = True
    conv_width: int = 4
    mlp_factor: int = 4
    form: str = "auto"
    kernel: str = "auto"
    remat_every: int = 0
    unroll: int | None = None
    stats: bool = True
    inner_opt: str | None = None
    inner_beta: float = 0.9
    gate: bool = False
    init_scale: float = common.DEFAULT_INIT_SCALE
    inner_out_init_scale: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=self.rope)
        self.make_learner()  # an unknown learner name fails here, in one line
        for name, known in (("backbone", BACKBONES), ("form", FORMS),
                            ("kernel", KERNELS), ("inner_opt", (None, *inner_opt.OPTIMIZERS))):
            checks.check_choice(name, getattr(self, name), known)
        for name, low in (("mini_batch", 0), ("remat_every", 0), ("conv_width", 1)):
            checks.check_int(name, getattr(self, name), low)  # mini_batch 0 = the whole sequence
        if self.unroll is not None and not (type(self.unroll) is int and self.unroll >= 1):
            raise ValueError(f"unroll: expected None or an int >= 1, got {self.unroll!r}")
        if self.gate and (self.inner_opt is not None or self.kernel == "pallas"):
            raise ValueError("gate=True runs plain mini-batch GD on the XLA forms only; use "
                             "inner_opt=None and kernel='auto' or 'xla'")
        if self.mini_batch == 0 and self.learn_eta:
            raise ValueError("mini_batch=0 (whole sequence) needs learn_eta=False: the learnable "
                             "token offsets have one entry per position of a fixed mini-batch")
        if self.learner == "mlp" and not self.learn_W0:
            raise ValueError("learn_W0=False fixes W0 = 0, where an MLP inner model has zero "
                             "gradients and never learns; use learner='linear' or learn_W0=True")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @nn.nowrap
    def make_learner(self) -> learners.Learner:
        """The inner model f(x; W) as a pure `ttt.ops.learners.Learner`."""
        bias = self.learn_W0 if self.inner_bias is None else self.inner_bias
        base = learners.build_learner(self.learner, bias=bias, init_scale=self.init_scale,
                                      mlp_factor=self.mlp_factor)
        return learners.ln_residual(base) if self.ln_residual else base

    # ------------------------------------------------------------------ parameters

    @nn.compact
    def _params(self) -> dict:
        """Every parameter as an array (created at init), named as in the official checkpoints;
        the inner model's W0 and LN parameters ("W0", "ttt_norm") come cast to the inner dtype."""
        C, H, d, pdt = self.width, self.num_heads, self.head_dim, self.param_dtype
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        normal = nn.initializers.normal(self.init_scale)
        group = lambda name, *specs: common.ParamGroup(specs, pdt, name=name)()
        kernel = lambda name, init=normal: group(name, ("kernel", init, (C, C)))["kernel"]
        p = {"W0": self._initial_state()}
        if self.ln_residual:
            p["ttt_norm"] = group("ttt_norm", ("scale", ones, (H, d)), ("bias", zeros, (H, d)))
        p["wq"] = kernel("wq")
        if self.backbone == "transformer":
            p["wk"] = kernel("wk")
        else:
            conv = (("kernel", nn.initializers.lecun_normal(), (self.conv_width, 1, C)),
                    ("bias", zeros, (C,)))
            p["conv_q"], p["conv_k"] = group("conv_q", *conv), group("conv_k", *conv)
        p["wv"] = kernel("wv")
        if self.learn_eta:
            p["lr_gate"] = group("learnable_ttt_lr", ("kernel", normal, (H, C, 1)),
                                 ("bias", zeros, (H, 1)))
            p["token_offset"] = self.param("learnable_token_idx", zeros, (self.mini_batch,), pdt)
        if self.gate:
            p["forget_gate"] = group("forget_gate", ("kernel", normal, (C, H)),
                                     ("A_log", _a_log_init, (H,)), ("dt_bias", _dt_bias_init, (H,)))
        if self.post_norm:
            p["post_norm"] = group("post_norm", ("scale", ones, (C,)), ("bias", zeros, (C,)))
        if self.backbone == "mamba":
            p["wg"] = kernel("wg")
        p["wo"] = kernel("wo")
        idt = common.inner_dtype(self.dtype)
        for key in ("W0", "ttt_norm"):
            p[key] = jax.tree_util.tree_map(lambda a: a.astype(idt), p.get(key))
        return p

    def _initial_state(self):
        """W0 with leading H: parameters ttt_dense_l / ttt_bias_l, or zeros (learn_W0=False)."""
        learner, pdt = self.make_learner(), self.param_dtype
        if learner.dense is None:  # any other learner: its whole tree as one parameter "W0"
            return common.inner_tree(self, learner, self.head_dim, self.num_heads,
                                     self.learn_W0, pdt)
        last = len(learner.dense) - 1

        def make(l, kernel_shape, bias_shape):
            std = self.inner_out_init_scale if l == last else None
            init = nn.initializers.normal(self.init_scale if std is None else std)
            w = self.param(f"ttt_dense_{l}", init, kernel_shape, pdt)
            if bias_shape is None:
                return w, None
            return w, self.param(f"ttt_bias_{l}", nn.initializers.zeros, bias_shape, pdt)

        return common.inner_weights(learner, self.head_dim, self.num_heads,
                                    make if self.learn_W0 else None, pdt)

    # ------------------------------------------------------------------ pure pieces

    @nn.nowrap
    def _inputs(self, p, x, ttt_lr_mult, pos0=0, tail=None):
        """x (B, N, C) -> q, k, v (B, H, N, d) after RoPE, gates a (B, H, N), per-token
        coefficients c (N,) (η_ij = c_i a_j) and the new conv tail (None without convs)."""
        dt, H, d, idt = self.dtype, self.num_heads, self.head_dim, common.inner_dtype(self.dtype)
        x = x.astype(dt)
        dense = lambda name: project(x, p[name].astype(dt))  # (B, N, C) @ (C, C) -> (B, N, C)
        new_tail = None
        if self.backbone == "transformer":
            q, k = dense("wq"), dense("wk")
        else:
            xqk = dense("wq")
            conv = lambda name: causal_conv(xqk, p[name]["kernel"][:, 0, :].astype(dt),
                                            p[name]["bias"].astype(dt), tail)
            (q, new_tail), (k, _) = conv("conv_q"), conv("conv_k")
        v = dense("wv")
        q, k, v = (common.split_heads(y, H) for y in (q, k, v))
        N = x.shape[1]
        i = ttt_state.positions(pos0, N, self.mini_batch)  # (N,) inside the mini-batch
        if self.rope:
            q, k = rope(q, i, self.rope_theta), rope(k, i, self.rope_theta)
        mult = jnp.asarray(ttt_lr_mult, idt)
        if self.learn_eta:
            gate = p["lr_gate"]
            a = ttt_state.lr_gate(x, gate["kernel"][:, :, 0], gate["bias"][:, 0], idt)
            c = ttt_state.lr_coefficients(i, p["token_offset"].astype(idt),
                                          self.base_lr / d * mult)
        else:
            const = self.base_lr / d if self.eta is None else self.eta
            a, c = jnp.ones((x.shape[0], H, N), idt), jnp.full((N,), const, idt) * mult
        return q.astype(idt), k.astype(idt), v.astype(idt), a, c, new_tail

    @nn.nowrap
    def _gate(self, p, x, key="log_alpha"):
        """{key: log a (B, H, N)} of the forget gate from x (B, N, C), or {} without a gate."""
        if not self.gate:
            return {}
        g, idt = p["forget_gate"], common.inner_dtype(self.dtype)
        la = ttt_state.forget_gate(x.astype(self.dtype), g["kernel"], g["A_log"], g["dt_bias"], idt)
        return {key: la[:, :, 0] if key == "log_alpha_t" else la}

    @nn.nowrap
    def _output(self, p, x, z):
        """Inner-loop output z (B, H, N, d) -> y (B, N, C): post-norm, gate (Mamba), Wo."""
        dt = self.dtype
        y = common.merge_heads(z.astype(dt))  # (B, N, C)
        if self.post_norm:
            idt, norm = common.inner_dtype(dt), p["post_norm"]
            y = layer_norm(y.astype(idt), norm["scale"].astype(idt), norm["bias"].astype(idt),
                           1e-6).astype(dt)
        if self.backbone == "mamba":
            y = nn.gelu(project(x.astype(dt), p["wg"].astype(dt)), approximate=True) * y
        return project(y, p["wo"].astype(dt))

    @nn.nowrap
    def _machine(self):  # `ttt_state` (plain GD) or the inner optimizer's generic path
        return inner_opt.machine(self.inner_opt, self.inner_beta)

    @nn.nowrap
    def _state_options(self):
        unroll = default_unroll() if self.unroll is None else self.unroll
        return dict(mini_batch=self.mini_batch, form=self.form, unroll=unroll, kernel=self.kernel)

    @nn.nowrap
    def _grouped(self, p, x, ttt_lr_mult):
        """The whole layer in jax.checkpoint'ed groups of remat_every mini-batches, carrying W and
        the conv tail (`scan_groups`); groups start at mini-batch boundaries, so the positions
        t mod b and every result equal the ungrouped layer's."""
        B, _, C = x.shape
        learner = self.make_learner()
        carry = {"W": ttt_state.init_state(p["W0"], B).W}
        if self.backbone == "mamba":
            carry["conv"] = jnp.zeros((B, self.conv_width - 1, C), self.dtype)

        def group(carry, x_g):  # x_g (T, B, C), token-major as scan_groups splits axis 0
            x_g = jnp.moveaxis(x_g, 0, 1)  # (B, T, C)
            q, k, v, a, c, tail = self._inputs(p, x_g, ttt_lr_mult, 0, carry.get("conv"))
            z, W = ttt_state.forward(learner, carry["W"], q, k, v, a, c, fixed=p["ttt_norm"],
                                     **self._state_options(), **self._gate(p, x_g))
            new = {"W": W} if tail is None else {"W": W, "conv": tail}
            return new, jnp.moveaxis(self._output(p, x_g, z), 1, 0)

        _, ys = scan_groups(group, carry, jnp.moveaxis(x, 1, 0), self.remat_every * self.mini_batch)
        return jnp.moveaxis(ys, 0, 1)  # (B, N, C)

    @nn.nowrap
    def _stats(self, p, k, v, a, c, gate=None):
        return {} if not self.stats or self.inner_opt is not None else ttt_state.inner_loss_stats(
            self.make_learner(), p["W0"], k, v, a, c, fixed=p["ttt_norm"],  # plain GD only
            mini_batch=self.mini_batch, form=self.form, **(gate or {}))

    # ------------------------------------------------------------------ public interface

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), aux). `ttt_lr_mult` scales η (TTT-MLP warm-up)."""
        del train
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        if 0 < self.remat_every * self.mini_batch < x.shape[1] and self.inner_opt is None:
            y = self._grouped(p, x, ttt_lr_mult)  # the inputs again for the diagnostics only:
            return y, (self._stats(p, *self._inputs(p, x, ttt_lr_mult)[1:5], self._gate(p, x))
                       if self.stats else {})
        q, k, v, a, c, _ = self._inputs(p, x, ttt_lr_mult)
        gate = self._gate(p, x)
        z, _ = self._machine().forward(self.make_learner(), p["W0"], q, k, v, a, c,
                                       fixed=p["ttt_norm"], remat_every=self.remat_every,
                                       **self._state_options(), **gate)
        return self._output(p, x, z), self._stats(p, k, v, a, c, gate)

    def init_cache(self, batch_size: int, dtype=None):
        """Empty decode cache {"W", "G": (B, H, ...), "pos": int32 [, "conv": (B, w−1, C)]}."""
        cache = self._machine().init_state(self._params()["W0"], batch_size)._asdict()
        if self.backbone == "mamba":
            cache["conv"] = jnp.zeros((batch_size, self.conv_width - 1, self.width),
                                      dtype or self.dtype)
        return cache

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), aux, cache after the N tokens)."""
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        q, k, v, a, c, tail = self._inputs(p, x, ttt_lr_mult)
        gate = self._gate(p, x)
        z, state = self._machine().prefill(self.make_learner(), p["W0"], q, k, v, a, c,
                                           fixed=p["ttt_norm"], remat_every=self.remat_every,
                                           **self._state_options(), **gate)
        cache = state._asdict()
        if tail is not None:
            cache["conv"] = tail.astype(self.dtype)
        return self._output(p, x, z), self._stats(p, k, v, a, c, gate), cache

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        State = getattr(self._machine(), "State", ttt_state.TTTState)
        keys = State._fields + (("conv",) if self.backbone == "mamba" else ())
        checks.check_step(type(self).__name__, x_t, cache, keys, self.width, batch_key="W")
        p = self._params()
        q, k, v, a, c, tail = self._inputs(p, x_t, ttt_lr_mult, cache["pos"], cache.get("conv"))
        state = State(*(cache[f] for f in State._fields))
        z_t, state = self._machine().step(self.make_learner(), state, q[:, :, 0], k[:, :, 0],
                                          v[:, :, 0], a[:, :, 0], c[0], fixed=p["ttt_norm"],
                                          mini_batch=self.mini_batch,
                                          **self._gate(p, x_t, "log_alpha_t"))
        new_cache = state._asdict()
        if tail is not None:
            new_cache["conv"] = tail.astype(cache["conv"].dtype)
        return self._output(p, x_t, z_t[:, :, None, :]), new_cache
