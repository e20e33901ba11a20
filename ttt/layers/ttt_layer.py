"""The TTT-LM sequence mixer: TTT-Linear or TTT-MLP on a transformer or Mamba backbone (design.md §5).

One module for every variant: the inner learner ("linear" | "mlp") and the backbone
("transformer" | "mamba") are attributes, and so is every ingredient of the TTT-LM paper's Table 1
ablation ladder (learn_W0, ln_residual, mini_batch, learn_eta, rope, post_norm, inner_bias).

The layer owns the parameters and the projections; the inner loop and its decode state are the
pure state machine `ttt.ops.ttt_state`:
  1. XQ, XK, XV projections (Mamba: shared XQK = x Wq, then causal depthwise convs conv_q / conv_k).
  2. RoPE on XQ, XK at position t mod b (interleaved pairs, θ = 10000).
  3. η_ij = c_i · a_j: c_i = base_lr · max(1/(i+1) + offset_i, 0) / d, a_j = sigmoid(x_j·k_h + c_h).
  4. One call into the state machine (forward, prefill or step) with f(x) = x + LN(f_res(x)).
  5. post-norm LayerNorm → (Mamba) gate gelu(x Wg) ⊙ · → output projection Wo.

Notable choices:
- Flax parameter names follow ttt-lm-jax (wq, wk, wv, wo, wg, conv_q, conv_k, learnable_ttt_lr,
  learnable_token_idx, ttt_norm, ttt_dense_0, ttt_bias_0, ttt_dense_1, ttt_bias_1, post_norm), so
  official checkpoints map by name. Shapes differ in one place: ttt_bias_l is (H, d_out), not
  (H, 1, d_out).
- All parameters are fetched first (`_params`) and everything after is a pure function of them,
  so `remat_every` can run the whole layer in `jax.checkpoint`ed groups (`scan_groups`).
- Any sequence length works (it need not divide by b nor equal a configured maximum);
  mini_batch=0 means one mini-batch spanning the whole sequence (batch GD).
- learn_eta=False replaces the whole η by the constant `eta` (default base_lr / d) — the "linear
  attention" rungs of the ablation ladder; there is no 1/(i+1) factor then.
- learn_W0=False fixes W0 = 0; inner_bias then defaults to False (a bias-free linear map).
- The inner loop runs in float32 (float64 when the layer computes in float64) whatever `dtype` is.
- Decoding: the cache is the state machine's TTTState (W at the mini-batch start, accumulated
  gradient G, position) plus the last conv_width − 1 inputs of the convolutions — a size
  independent of the context length.
- aux (when `stats`): the inner reconstruction errors of `ttt_state.inner_loss_stats` at W0
  ("inner_loss_init"), before ("inner_loss_before") and after ("inner_loss_after") each token's
  update; one extra stop-gradient inner pass, skipped with stats=False.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, learners, ttt_state
from ttt.ops._scan import scan_groups
from ttt.ops.primitives import causal_conv, layer_norm, rope

LEARNERS = ("linear", "mlp")
BACKBONES = ("transformer", "mamba")
FORMS = ("auto", "dual", "primal")
GPU_UNROLL = 8  # mini-batch steps per loop iteration on a GPU (measured: docs/benchmarks.md)


def default_unroll(backend: str | None = None) -> int:
    """Unroll of the mini-batch scan when the layer's `unroll` is None: GPU_UNROLL on a GPU, else 1.

    A GPU pays a fixed cost per iteration of a compiled loop that the per-mini-batch matmuls
    (b × d by d × d per head) are too small to hide; the CPU gains nothing and compiles longer.
    """
    return GPU_UNROLL if (backend or jax.default_backend()) == "gpu" else 1


class TTTMixer(nn.Module):
    """TTT-LM sequence mixer: (B, N, C) -> (B, N, C), with a constant-size decode cache.

    Attributes (defaults are TTT-Linear, transformer backbone, as in ttt-lm-jax):
      width, num_heads: C and H (d = C / H).
      learner: "linear" (f_res = x W1 + b1) or "mlp" (gelu_tanh(x W1 + b1) W2 + b2, hidden
        mlp_factor·d).
      backbone: "transformer" (wq, wk, wv) or "mamba" (wq shared by Q and K + conv_q, conv_k of
        width conv_width with bias; output gate wg).
      mini_batch: b; 0 = the whole sequence is one mini-batch.
      base_lr: η scale (1.0 TTT-Linear, 0.1 TTT-MLP); learn_eta: learnable η (token offsets +
        per-head sigmoid gate); eta: the constant η when learn_eta=False (default base_lr / d).
      learn_W0: learn the initial state (else W0 = 0); inner_bias: biases in f_res (default =
        learn_W0); ln_residual: f(x) = x + LN(f_res(x)) (else f = f_res); rope, rope_theta;
        post_norm: LayerNorm on the inner-loop output.
      form: "auto" | "dual" | "primal" inner-loop form; remat_every: run the layer in checkpointed
        groups of that many mini-batches (0 = off): training memory of one group's activations
        plus one inner state per group instead of every whole-sequence activation, at the cost
        of a second forward pass in the backward.
      unroll: mini-batch steps per compiled loop iteration (same results); None =
        `default_unroll()`: 8 on a GPU, where it made the layer's fwd+bwd ~30 % faster, 1
        elsewhere (on the CPU it only lengthened compiles; docs/benchmarks.md).
      stats: return the inner reconstruction diagnostics in aux (one extra no-grad inner pass).
      init_scale: std of projections and W0; inner_out_init_scale: std of the last inner dense
        layer (ttt-lm-jax uses init_scale / sqrt(2 · layers) for TTT-MLP; default init_scale).
      dtype: compute dtype of projections and norms; param_dtype: parameters (float32).
    """

    width: int
    num_heads: int
    learner: str = "linear"
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
    remat_every: int = 0
    unroll: int | None = None
    stats: bool = True
    init_scale: float = common.DEFAULT_INIT_SCALE
    inner_out_init_scale: float | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        checks.check_heads(type(self).__name__, self.width, self.num_heads, even_head_dim=self.rope)
        checks.check_choice("learner", self.learner, LEARNERS)
        checks.check_choice("backbone", self.backbone, BACKBONES)
        checks.check_choice("form", self.form, FORMS)
        if not (isinstance(self.mini_batch, int) and self.mini_batch >= 0):
            raise ValueError(
                f"mini_batch: expected an int >= 0 (0 = whole sequence), got {self.mini_batch!r}"
            )
        if self.mini_batch == 0 and self.learn_eta:
            raise ValueError(
                "mini_batch=0 (whole sequence) needs learn_eta=False: the learnable token offsets "
                "have one entry per position of a fixed-size mini-batch"
            )
        if self.learner == "mlp" and not self.learn_W0:
            raise ValueError(
                "learn_W0=False fixes W0 = 0, where an MLP inner model has zero gradients and "
                "never learns; use learner='linear' or learn_W0=True"
            )
        if not (isinstance(self.remat_every, int) and self.remat_every >= 0):
            raise ValueError(f"remat_every: expected an int >= 0, got {self.remat_every!r}")
        if self.unroll is not None and not (
                isinstance(self.unroll, int) and not isinstance(self.unroll, bool)
                and self.unroll >= 1):
            raise ValueError(f"unroll: expected None or an int >= 1, got {self.unroll!r}")
        if self.conv_width < 1:
            raise ValueError(f"conv_width: expected >= 1, got {self.conv_width}")
        super().__post_init__()

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @nn.nowrap
    def make_learner(self) -> learners.Learner:
        """The inner model f(x; W) as a pure `ttt.ops.learners.Learner`."""
        bias = self.learn_W0 if self.inner_bias is None else self.inner_bias
        if self.learner == "linear":
            base = learners.linear(bias=bias, init_scale=self.init_scale)
        else:
            base = learners.mlp(factor=self.mlp_factor, bias=bias, init_scale=self.init_scale)
        return learners.ln_residual(base) if self.ln_residual else base

    # ------------------------------------------------------------------ parameters

    @nn.compact
    def _params(self) -> dict:
        """Every parameter as an array (created at init), named as in the official checkpoints."""
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
        if self.post_norm:
            p["post_norm"] = group("post_norm", ("scale", ones, (C,)), ("bias", zeros, (C,)))
        if self.backbone == "mamba":
            p["wg"] = kernel("wg")
        p["wo"] = kernel("wo")
        return p

    def _initial_state(self):
        """W0 with leading H: parameters ttt_dense_l / ttt_bias_l, or zeros (learn_W0=False)."""
        n_dense = len(self.make_learner().dense)

        def make(l, kernel_shape, bias_shape):
            std = self.init_scale
            if l == n_dense - 1 and self.inner_out_init_scale is not None:
                std = self.inner_out_init_scale
            pdt = self.param_dtype
            w = self.param(f"ttt_dense_{l}", nn.initializers.normal(std), kernel_shape, pdt)
            if bias_shape is None:
                return w, None
            return w, self.param(f"ttt_bias_{l}", nn.initializers.zeros, bias_shape, pdt)

        return common.inner_weights(self.make_learner(), self.head_dim, self.num_heads,
                                    make if self.learn_W0 else None, self.param_dtype)

    # ------------------------------------------------------------------ pure pieces

    @nn.nowrap
    def _inner(self, p):
        """W0 and the fixed LN params of the inner model, in the inner dtype."""
        idt = common.inner_dtype(self.dtype)
        cast = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(idt), tree)
        return cast(p["W0"]), cast(p.get("ttt_norm"))

    @nn.nowrap
    def _inputs(self, p, x, ttt_lr_mult, pos0=0, tail=None):
        """x (B, N, C) -> q, k, v (B, H, N, d) after RoPE, gates a (B, H, N), per-token
        coefficients c (N,) (η_ij = c_i a_j) and the new conv tail (None without convs)."""
        dt, H, d = self.dtype, self.num_heads, self.head_dim
        idt = common.inner_dtype(dt)
        x = x.astype(dt)
        dense = lambda name: x @ p[name].astype(dt)  # (B, N, C) @ (C, C) -> (B, N, C)
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
        t = pos0 + jnp.arange(N)  # (N,) absolute positions
        i = t % self.mini_batch if self.mini_batch > 0 else t  # position inside the mini-batch
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
    def _output(self, p, x, z):
        """Inner-loop output z (B, H, N, d) -> y (B, N, C): post-norm, gate (Mamba), Wo."""
        dt = self.dtype
        y = common.merge_heads(z.astype(dt))  # (B, N, C)
        if self.post_norm:
            idt = common.inner_dtype(dt)
            norm = p["post_norm"]
            y = layer_norm(y.astype(idt), norm["scale"].astype(idt), norm["bias"].astype(idt),
                           1e-6).astype(dt)
        if self.backbone == "mamba":
            y = nn.gelu(x.astype(dt) @ p["wg"].astype(dt), approximate=True) * y
        return y @ p["wo"].astype(dt)

    @nn.nowrap
    def _state_options(self):
        unroll = default_unroll() if self.unroll is None else self.unroll
        return dict(mini_batch=self.mini_batch, form=self.form, unroll=unroll)

    @nn.nowrap
    def _grouped(self, p, x, ttt_lr_mult):
        """The whole layer in jax.checkpoint'ed groups of remat_every mini-batches (`scan_groups`):
        each group runs projections, RoPE, η, the inner loop and the output on its own tokens,
        carrying the inner state W and the conv tail, so the backward keeps one group's
        activations at a time. Groups start at mini-batch boundaries, so every position t mod b
        and every result equals the ungrouped layer's."""
        B, _, C = x.shape
        learner = self.make_learner()
        W0, fixed = self._inner(p)
        carry = {"W": ttt_state.init_state(W0, B).W}
        if self.backbone == "mamba":
            carry["conv"] = jnp.zeros((B, self.conv_width - 1, C), self.dtype)

        def group(carry, x_g):  # x_g (T, B, C), token-major as scan_groups splits axis 0
            x_g = jnp.moveaxis(x_g, 0, 1)  # (B, T, C)
            q, k, v, a, c, tail = self._inputs(p, x_g, ttt_lr_mult, 0, carry.get("conv"))
            z, W = ttt_state.forward(learner, carry["W"], q, k, v, a, c, fixed=fixed,
                                     **self._state_options())
            new = {"W": W} if tail is None else {"W": W, "conv": tail}
            return new, jnp.moveaxis(self._output(p, x_g, z), 1, 0)

        _, ys = scan_groups(group, carry, jnp.moveaxis(x, 1, 0), self.remat_every * self.mini_batch)
        return jnp.moveaxis(ys, 0, 1)  # (B, N, C)

    @nn.nowrap
    def _stats(self, p, k, v, a, c):
        if not self.stats:
            return {}
        W0, fixed = self._inner(p)
        return ttt_state.inner_loss_stats(self.make_learner(), W0, k, v, a, c, fixed=fixed,
                                          mini_batch=self.mini_batch, form=self.form)

    # ------------------------------------------------------------------ public interface

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), aux). `ttt_lr_mult` scales η (TTT-MLP warm-up)."""
        del train
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        if 0 < self.remat_every * self.mini_batch < x.shape[1]:
            y = self._grouped(p, x, ttt_lr_mult)
            if not self.stats:
                return y, {}
            _, k, v, a, c, _ = self._inputs(p, x, ttt_lr_mult)  # for the diagnostics only
            return y, self._stats(p, k, v, a, c)
        q, k, v, a, c, _ = self._inputs(p, x, ttt_lr_mult)
        W0, fixed = self._inner(p)
        z, _ = ttt_state.forward(self.make_learner(), W0, q, k, v, a, c, fixed=fixed,
                                 remat_every=self.remat_every, **self._state_options())
        return self._output(p, x, z), self._stats(p, k, v, a, c)

    def init_cache(self, batch_size: int, dtype=None):
        """Empty decode cache {"W", "G": (B, H, ...), "pos": int32 [, "conv": (B, w−1, C)]}."""
        W0, _ = self._inner(self._params())
        cache = ttt_state.init_state(W0, batch_size)._asdict()
        if self.backbone == "mamba":
            cache["conv"] = jnp.zeros((batch_size, self.conv_width - 1, self.width),
                                      dtype or self.dtype)
        return cache

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), aux, cache after the N tokens)."""
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        q, k, v, a, c, tail = self._inputs(p, x, ttt_lr_mult)
        W0, fixed = self._inner(p)
        z, state = ttt_state.prefill(self.make_learner(), W0, q, k, v, a, c, fixed=fixed,
                                     remat_every=self.remat_every, **self._state_options())
        cache = state._asdict()
        if tail is not None:
            cache["conv"] = tail.astype(self.dtype)
        return self._output(p, x, z), self._stats(p, k, v, a, c), cache

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        name = type(self).__name__
        if jnp.ndim(x_t) != 3 or x_t.shape[1] != 1:
            raise ValueError(f"{name}.step: x_t must be (B, 1, C), got {jnp.shape(x_t)}")
        checks.check_input(name, x_t, self.width)
        self._check_cache(cache, x_t.shape[0])
        p = self._params()
        q, k, v, a, c, tail = self._inputs(p, x_t, ttt_lr_mult, cache["pos"], cache.get("conv"))
        _, fixed = self._inner(p)
        state = ttt_state.TTTState(cache["W"], cache["G"], cache["pos"])
        z_t, state = ttt_state.step(self.make_learner(), state, q[:, :, 0], k[:, :, 0],
                                    v[:, :, 0], a[:, :, 0], c[0], fixed=fixed,
                                    mini_batch=self.mini_batch)
        new_cache = state._asdict()
        if tail is not None:
            new_cache["conv"] = tail.astype(cache["conv"].dtype)
        return self._output(p, x_t, z_t[:, :, None, :]), new_cache

    @nn.nowrap
    def _check_cache(self, cache, B):
        keys = {"W", "G", "pos"} | ({"conv"} if self.backbone == "mamba" else set())
        if not isinstance(cache, dict) or set(cache) != keys:
            got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
            raise ValueError(
                f"cache: expected a dict with keys {sorted(keys)} (from init_cache or prefill), "
                f"got {got}"
            )
        lead = jax.tree_util.tree_leaves(cache["W"])[0].shape[:2]
        if lead != (B, self.num_heads):
            raise ValueError(f"cache: built for (batch, heads) = {lead}, but x_t has batch {B}")
