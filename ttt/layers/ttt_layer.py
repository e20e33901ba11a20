"""The TTT-LM sequence mixer (TTT-Linear / TTT-MLP, transformer or Mamba backbone), DESIGN §3.

One module for every variant: the inner learner ("linear" | "mlp") and the backbone
("transformer" | "mamba") are attributes, and so is every ingredient of the TTT-LM paper's Table 1
ablation ladder (learn_W0, ln_residual, mini_batch, learn_eta, rope, post_norm, inner_bias).

Per head (d = width / heads, b = mini_batch):
  1. XQ, XK, XV projections (Mamba: shared XQK = x Wq, then causal depthwise convs conv_q / conv_k).
  2. RoPE on XQ, XK at position t mod b (interleaved pairs, θ = 10000).
  3. η_ij = base_lr · max(1/(i+1) + offset_i, 0) · sigmoid(x_j·k_h + c_h) / d  = c_i · a_j.
  4. Inner loop `ttt.ops.ttt.ttt` (dual form) with f(x) = x + LN(f_res(x)).
  5. post-norm LayerNorm → (Mamba) gate gelu(x Wg) ⊙ · → output projection Wo.

Notable choices:
- Flax parameter names follow ttt-lm-jax (wq, wk, wv, wo, wg, conv_q, conv_k, learnable_ttt_lr,
  learnable_token_idx, ttt_norm, ttt_dense_0, ttt_bias_0, ttt_dense_1, ttt_bias_1, post_norm), so
  official checkpoints map by name. Shapes differ in one place: ttt_bias_l is (H, d_out), not
  (H, 1, d_out).
- Any sequence length works (it need not divide by b nor equal a configured maximum);
  mini_batch=0 means one mini-batch spanning the whole sequence (batch GD).
- learn_eta=False replaces the whole η by the constant `eta` (default base_lr / d) — the "linear
  attention" rungs of the ablation ladder; there is no 1/(i+1) factor then.
- learn_W0=False fixes W0 = 0; inner_bias then defaults to False (a bias-free linear map).
- The inner loop runs in float32 (float64 when the layer computes in float64) whatever `dtype` is.
- Decoding: the cache holds the per-sequence state at the start of the current mini-batch, the
  gradient accumulated over its tokens so far (η_ij = c_i a_j factorises), the position and the
  last conv_width − 1 inputs of the convolutions — a size independent of the context length.
- aux (when `stats`): mean squared reconstruction error (over batch, heads, tokens and features,
  the ttt-lm-jax "ttt_loss_mse") of every token at W0 ("inner_loss_init"), at the state its
  mini-batch started from ("inner_loss_before"), and at the state after the update that includes
  its own gradient ("inner_loss_after"; for the last token of a mini-batch this is the carried
  state). They cost one extra stop-gradient inner pass; set stats=False to skip it.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import learners
from ttt.ops import ttt as ttt_ops

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


def eta_rows(a, coef, b: int):
    """The b×b learning rates in the ops' row layout.

    a: (B, H, N) per-token gates a_j; coef: (b,) per-position coefficients c_i.
    Returns (B, H, N, b): for token t = m·b + i, column j holds c_i · a_{m·b + j} (0 past N).
    """
    B, H, N = a.shape
    rows = _eta_blocks(a, coef, b)  # (B, H, M, b_i, b_j)
    return rows.reshape(B, H, -1, b)[:, :, :N]  # (B, H, N, b)


def _eta_blocks(a, coef, b: int):
    """(B, H, M, b_i, b_j) blocks c_i · a_{m·b + j}, zero past N."""
    B, H, N = a.shape
    M = -(-N // b)
    ap = jnp.pad(a, ((0, 0), (0, 0), (0, M * b - N))).reshape(B, H, M, b)  # (B, H, M, b_j)
    # an einsum, not a broadcast product: its gradient is then a dot, not a reduce of a product
    return jnp.einsum("i,bhmj->bhmij", coef, ap)


def reconstruction_stats(learner, W0, fixed, k, v, a, coef, b: int, form: str = "auto"):
    """Inner reconstruction errors before/after the update (diagnostics; no gradient).

    k: (B, H, N, d); v: (B, H, N, d_out); a: (B, H, N); coef: (b,); W0, fixed: leading H.
    One inner pass over a sequence where every mini-batch is preceded by a copy of its keys with
    zero learning rates: the copies are answered at the mini-batch's starting state ("before"),
    the originals after the causal update including their own gradient ("after").
    Returns {"inner_loss_init", "inner_loss_before", "inner_loss_after"}: float32 scalars.
    """
    sg = jax.lax.stop_gradient
    k, v, a, coef, W0, fixed = sg((k, v, a, coef, W0, fixed))
    B, H, N, d = k.shape
    dv = v.shape[-1]
    M = -(-N // b)

    def doubled(x):  # (B, H, N, e) -> (B, H, 2·M·b, e): [copy of mini-batch m, mini-batch m] ...
        x = jnp.pad(x, ((0, 0), (0, 0), (0, M * b - N), (0, 0)))
        x = x.reshape(B, H, M, 1, b, x.shape[-1])  # (B, H, M, 1, b, e)
        return jnp.concatenate([x, x], axis=3).reshape(B, H, 2 * M * b, x.shape[-1])

    rows = _eta_blocks(a, coef, b)  # (B, H, M, b_i, b_j)
    zero = jnp.zeros_like(rows)
    top = jnp.concatenate([zero, zero], axis=-1)  # copies: learn nothing, (B, H, M, b, 2b)
    bottom = jnp.concatenate([zero, rows], axis=-1)  # originals: see only originals
    eta2 = jnp.concatenate([top, bottom], axis=3).reshape(B, H, 2 * M * b, 2 * b)
    k2, v2 = doubled(k), doubled(v)
    z2, _ = ttt_ops.ttt(learner, W0, k2, k2, v2, eta2, mini_batch=2 * b, fixed=fixed, form=form)
    z2 = z2.reshape(B, H, M, 2, b, dv)  # (B, H, M, copy|original, b, dv)
    before = z2[:, :, :, 0].reshape(B, H, M * b, dv)[:, :, :N]
    after = z2[:, :, :, 1].reshape(B, H, M * b, dv)[:, :, :N]
    per_head = jax.vmap(learner.apply, in_axes=(0, 1, 0 if fixed is not None else None), out_axes=1)
    init = per_head(W0, k, fixed)  # (B, H, N, dv)
    return {
        "inner_loss_init": common.mean_sq(init - v),
        "inner_loss_before": common.mean_sq(before - v),
        "inner_loss_after": common.mean_sq(after - v),
    }


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
        of a second forward pass in the backward (see _grouped_call).
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
        name = type(self).__name__
        common.check_heads(name, self.width, self.num_heads, even_head_dim=self.rope)
        common.check_choice("learner", self.learner, LEARNERS)
        common.check_choice("backbone", self.backbone, BACKBONES)
        common.check_choice("form", self.form, FORMS)
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

    # ------------------------------------------------------------------ static pieces

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def make_learner(self) -> learners.Learner:
        """The inner model f(x; W) as a pure `ttt.ops.learners.Learner`."""
        bias = self.learn_W0 if self.inner_bias is None else self.inner_bias
        if self.learner == "linear":
            base = learners.linear(bias=bias, init_scale=self.init_scale)
        else:
            base = learners.mlp(factor=self.mlp_factor, bias=bias, init_scale=self.init_scale)
        return learners.ln_residual(base) if self.ln_residual else base

    def _b(self, n: int) -> int:
        """Mini-batch size for a sequence of n tokens."""
        return self.mini_batch if self.mini_batch > 0 else n

    # ------------------------------------------------------------------ parameters (inside _run)

    def _inner_params(self, learner):
        """W0 (leading H) and the fixed LN params of the inner model, in the inner dtype."""
        H, d = self.num_heads, self.head_dim
        idt = common.inner_dtype(self.dtype)
        shapes = jax.eval_shape(lambda key: learner.init(key, d), jax.random.PRNGKey(0))
        W0 = {}
        n_dense = len(learner.dense)
        for l, (w_name, b_name) in enumerate(learner.dense):
            if not self.learn_W0:
                W0[w_name] = jnp.zeros((H, *shapes[w_name].shape), idt)
                if b_name is not None:
                    W0[b_name] = jnp.zeros((H, *shapes[b_name].shape), idt)
                continue
            std = self.init_scale
            if l == n_dense - 1 and self.inner_out_init_scale is not None:
                std = self.inner_out_init_scale
            W0[w_name] = self.param(
                f"ttt_dense_{l}",
                nn.initializers.normal(std),
                (H, *shapes[w_name].shape),
                self.param_dtype,
            ).astype(idt)
            if b_name is not None:
                W0[b_name] = self.param(
                    f"ttt_bias_{l}",
                    nn.initializers.zeros,
                    (H, *shapes[b_name].shape),
                    self.param_dtype,
                ).astype(idt)
        fixed = None
        if self.ln_residual:
            specs = (
                ("scale", nn.initializers.ones, (H, d)),
                ("bias", nn.initializers.zeros, (H, d)),
            )
            fixed = common.ParamGroup(specs, self.param_dtype, name="ttt_norm")()
            fixed = jax.tree_util.tree_map(lambda p: p.astype(idt), fixed)
        return W0, fixed

    def _eta_parts(self, x, ttt_lr_mult):
        """Per-token gates a (B, H, N) and the coefficient function i -> c_i (η_ij = c_i a_j)."""
        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        idt = common.inner_dtype(self.dtype)
        mult = jnp.asarray(ttt_lr_mult, idt)
        if not self.learn_eta:
            const = self.base_lr / d if self.eta is None else self.eta
            return jnp.ones((B, H, N), idt), lambda i: jnp.full(jnp.shape(i), const, idt) * mult
        specs = (
            ("kernel", nn.initializers.normal(self.init_scale), (H, C, 1)),
            ("bias", nn.initializers.zeros, (H, 1)),
        )
        gate = common.ParamGroup(specs, self.param_dtype, name="learnable_ttt_lr")()
        kernel = gate["kernel"][:, :, 0].astype(self.dtype)  # (H, C)
        logits = jnp.einsum("bnc,hc->bhn", x.astype(self.dtype), kernel)  # (B, H, N)
        a = jax.nn.sigmoid(logits.astype(idt) + gate["bias"].astype(idt)[None, :, :])  # (B, H, N)
        offset = self.param(
            "learnable_token_idx", nn.initializers.zeros, (self.mini_batch,), self.param_dtype
        ).astype(idt)

        def coef(i):
            base = 1.0 / (jnp.asarray(i, idt) + 1.0) + offset[i]
            return self.base_lr * jnp.maximum(base, 0.0) / d * mult

        return a, coef

    def _projections(self, x, tail):
        """x (B, N, C) -> q, k, v (B, H, N, d) before RoPE, and the new conv tail (or None)."""
        C, dt, pdt = self.width, self.dtype, self.param_dtype
        x = x.astype(dt)
        if self.backbone == "transformer":
            q = common.dense(C, "wq", dt, pdt, self.init_scale)(x)
            k = common.dense(C, "wk", dt, pdt, self.init_scale)(x)
            new_tail = None
        else:
            xqk = common.dense(C, "wq", dt, pdt, self.init_scale)(x)
            q, new_tail = common.CausalConv(C, self.conv_width, dt, pdt, name="conv_q")(xqk, tail)
            k, _ = common.CausalConv(C, self.conv_width, dt, pdt, name="conv_k")(xqk, tail)
        v = common.dense(C, "wv", dt, pdt, self.init_scale)(x)
        H = self.num_heads
        return (
            common.split_heads(q, H),
            common.split_heads(k, H),
            common.split_heads(v, H),
            new_tail,
        )

    def _output(self, x, z):
        """Inner-loop output z (B, H, N, d) -> y (B, N, C): post-norm, gate (Mamba), Wo."""
        C, dt, pdt = self.width, self.dtype, self.param_dtype
        y = common.merge_heads(z.astype(dt))  # (B, N, C)
        if self.post_norm:
            y = common.LayerNorm(epsilon=1e-6, dtype=dt, param_dtype=pdt, name="post_norm")(y)
        if self.backbone == "mamba":
            g = common.dense(C, "wg", dt, pdt, self.init_scale)(x.astype(dt))
            y = nn.gelu(g, approximate=True) * y
        return common.dense(C, "wo", dt, pdt, self.init_scale)(y)

    # ------------------------------------------------------------------ the one compact method

    @nn.compact
    def _run(self, mode, x=None, cache=None, ttt_lr_mult=1.0, batch_size=None, cache_dtype=None):
        learner = self.make_learner()
        W0, fixed = self._inner_params(learner)
        idt = common.inner_dtype(self.dtype)
        if mode == "init_cache":
            return self._empty_cache(W0, batch_size, cache_dtype)
        common.check_input(type(self).__name__, x, self.width)
        B, N, _ = x.shape
        if mode == "step":
            self._check_cache(cache, B)
        if mode == "call" and self._group_tokens(N) and not self.is_initializing():
            return self._grouped_call(x, ttt_lr_mult, learner, W0, fixed)
        tail = cache.get("conv") if cache is not None else None
        q, k, v, new_tail = self._projections(x, tail)
        a, coef = self._eta_parts(x, ttt_lr_mult)
        pos0 = cache["pos"] if mode == "step" else 0
        t = pos0 + jnp.arange(N)  # (N,) absolute positions
        i = t % self.mini_batch if self.mini_batch > 0 else t  # position inside the mini-batch
        if self.rope:
            q = common.apply_rope(q, i, self.rope_theta)
            k = common.apply_rope(k, i, self.rope_theta)
        q, k, v = q.astype(idt), k.astype(idt), v.astype(idt)

        if mode == "call":
            b = self._b(N)
            z, _ = ttt_ops.ttt(
                learner,
                W0,
                q,
                k,
                v,
                eta_rows(a, coef(jnp.arange(b)), b),
                mini_batch=b,
                fixed=fixed,
                remat_every=self.remat_every,
                unroll=self._unroll(),
                form=self.form,
            )
            aux = self._stats(learner, W0, fixed, k, v, a, coef, N)
            return self._output(x, z), aux
        if mode == "group":  # one remat group of _grouped_call: the state comes in `cache`
            b = self.mini_batch
            z, W = ttt_ops.ttt(learner, cache["W"], q, k, v, eta_rows(a, coef(jnp.arange(b)), b),
                               mini_batch=b, fixed=fixed, unroll=self._unroll(), form=self.form)
            state = {"W": W} if new_tail is None else {"W": W, "conv": new_tail}
            return self._output(x, z), state
        if mode == "prefill":
            z, state = self._prefill_inner(learner, W0, fixed, q, k, v, a, coef)
            state["pos"] = jnp.asarray(N, jnp.int32)
            if new_tail is not None:
                state["conv"] = new_tail.astype(cache_dtype or self.dtype)
            aux = self._stats(learner, W0, fixed, k, v, a, coef, N)
            return self._output(x, z), aux, state
        # mode == "step": N == 1
        c_t = jnp.broadcast_to(coef(i[0]), (B, self.num_heads)).astype(idt)
        z_t, G = ttt_ops.ttt_decode_step(
            learner,
            cache["W"],
            cache["G"],
            q[:, :, 0],
            k[:, :, 0],
            v[:, :, 0],
            a[:, :, 0],
            c_t,
            fixed=fixed,
        )
        close = (i[0] == self.mini_batch - 1) if self.mini_batch > 0 else jnp.asarray(False)
        W, G = _close_minibatch(cache["W"], G, c_t, close)
        new_cache = dict(cache, W=W, G=G, pos=cache["pos"] + 1)
        if new_tail is not None:
            new_cache["conv"] = new_tail.astype(cache["conv"].dtype)
        return self._output(x, z_t[:, :, None, :]), new_cache

    def _unroll(self) -> int:
        return default_unroll() if self.unroll is None else self.unroll

    def _group_tokens(self, N: int) -> int:
        """Tokens per remat group of the whole layer (0 = no grouping; see _grouped_call)."""
        T = self.remat_every * self.mini_batch
        return T if 0 < T < N else 0

    def _grouped_call(self, x, ttt_lr_mult, learner, W0, fixed):
        """mode "call" with remat_every = n > 0: the whole layer in groups of n mini-batches.

        A lax.scan over groups of T = n·b tokens, each group under jax.checkpoint, carries the
        inner state W (and the Mamba conv tail) from group to group; a group runs projections,
        RoPE, η, the inner loop and the output projection on its own T tokens (mode "group", by a
        functional apply of this module on its own parameters). The backward pass recomputes one
        group at a time, so training memory holds x, one state per group and one group's
        intermediates instead of every whole-sequence activation. Same results as the ungrouped
        layer (tests); the sequence is padded with zeros to whole groups, and the padded tokens
        come after every real one, so they change no output.
        """
        B, N, C = x.shape
        T = self._group_tokens(N)
        G = -(-N // T)
        xs = jnp.pad(x, ((0, 0), (0, G * T - N), (0, 0))).reshape(B, G, T, C)
        xs = jnp.moveaxis(xs, 1, 0)  # (G, B, T, C)
        state = {"W": common.broadcast_heads(W0, B)}
        if self.backbone == "mamba":
            state["conv"] = jnp.zeros((B, self.conv_width - 1, C), self.dtype)
        params = self.variables["params"]
        plain = self.clone(parent=None, remat_every=0, stats=False)

        @jax.checkpoint
        def group(state, x_g):
            y_g, state = plain.apply({"params": params}, "group", x_g, cache=state,
                                     ttt_lr_mult=ttt_lr_mult, method=TTTMixer._run)
            return state, y_g

        _, ys = jax.lax.scan(group, state, xs)  # ys (G, B, T, C)
        y = jnp.moveaxis(ys, 0, 1).reshape(B, G * T, C)[:, :N]
        if not self.stats:
            return y, {}
        # the diagnostics need k, v, η of the whole sequence (a forward pass without gradient)
        _, k, v, _ = self._projections(x, None)
        a, coef = self._eta_parts(x, ttt_lr_mult)
        i = jnp.arange(N) % self.mini_batch
        if self.rope:
            k = common.apply_rope(k, i, self.rope_theta)
        idt = common.inner_dtype(self.dtype)
        return y, self._stats(learner, W0, fixed, k.astype(idt), v.astype(idt), a, coef, N)

    def _stats(self, learner, W0, fixed, k, v, a, coef, N):
        if not self.stats:
            return {}
        b = self._b(N)
        return reconstruction_stats(learner, W0, fixed, k, v, a, coef(jnp.arange(b)), b, self.form)

    def _prefill_inner(self, learner, W0, fixed, q, k, v, a, coef):
        """Whole mini-batches in the chosen form, then the remainder token by token (decode)."""
        B, H, N, _ = q.shape
        b = self.mini_batch
        n_full = (N // b) * b if b > 0 else 0
        zs = []
        if n_full:
            sl = lambda x: x[:, :, :n_full]
            z, W = ttt_ops.ttt(
                learner,
                W0,
                sl(q),
                sl(k),
                sl(v),
                eta_rows(sl(a), coef(jnp.arange(b)), b),
                mini_batch=b,
                fixed=fixed,
                remat_every=self.remat_every,
                unroll=self._unroll(),
                form=self.form,
            )
            zs.append(z)
        else:
            W = common.broadcast_heads(W0, B)
        G = jax.tree_util.tree_map(jnp.zeros_like, W)
        if N > n_full:
            # the remainder never closes its mini-batch (fewer than b tokens, or b = whole sequence)
            idt = common.inner_dtype(self.dtype)
            c = coef(jnp.arange(N - n_full)).astype(idt)  # (r,)
            xs = tuple(jnp.moveaxis(x[:, :, n_full:], 2, 0) for x in (q, k, v, a))  # (r, B, H, ·)

            def one(G, xs_t):
                (q_t, k_t, v_t, a_t), c_t = xs_t
                c_bh = jnp.broadcast_to(c_t, (B, H))
                z_t, G = ttt_ops.ttt_decode_step(
                    learner, W, G, q_t, k_t, v_t, a_t, c_bh, fixed=fixed
                )
                return G, z_t

            G, z_r = jax.lax.scan(one, G, (xs, c))  # z_r (r, B, H, d)
            zs.append(jnp.moveaxis(z_r, 0, 2))  # (B, H, r, d)
        z = jnp.concatenate(zs, axis=2) if len(zs) > 1 else zs[0]
        return z, {"W": W, "G": G}

    def _empty_cache(self, W0, batch_size, cache_dtype):
        W = common.broadcast_heads(W0, batch_size)
        cache = {
            "W": W,
            "G": jax.tree_util.tree_map(jnp.zeros_like, W),
            "pos": jnp.zeros((), jnp.int32),
        }
        if self.backbone == "mamba":
            cache["conv"] = jnp.zeros(
                (batch_size, self.conv_width - 1, self.width), cache_dtype or self.dtype
            )
        return cache

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

    # ------------------------------------------------------------------ public interface

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), aux). `ttt_lr_mult` scales η (TTT-MLP warm-up)."""
        del train
        return self._run("call", x, ttt_lr_mult=ttt_lr_mult)

    def init_cache(self, batch_size: int, dtype=None):
        """Empty decode cache {"W", "G": (B, H, ...), "pos": int32 [, "conv": (B, w−1, C)]}."""
        return self._run("init_cache", batch_size=batch_size, cache_dtype=dtype)

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), aux, cache after the N tokens)."""
        return self._run("prefill", x, ttt_lr_mult=ttt_lr_mult)

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        if jnp.ndim(x_t) != 3 or x_t.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__}.step: x_t must be (B, 1, C), got {jnp.shape(x_t)}"
            )
        return self._run("step", x_t, cache=cache, ttt_lr_mult=ttt_lr_mult)


def _close_minibatch(W, G, c_t, close):
    """At a mini-batch's last token: W ← W − c_last G, G ← 0; otherwise unchanged. c_t (B, H)."""

    def new_w(w, g):
        c = c_t.reshape(c_t.shape + (1,) * (w.ndim - 2)).astype(w.dtype)
        return jnp.where(close, w - c * g, w)

    W = jax.tree_util.tree_map(new_w, W, G)
    G = jax.tree_util.tree_map(lambda g: jnp.where(close, jnp.zeros_like(g), g), G)
    return W, G
