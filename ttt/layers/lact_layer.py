"""The large-chunk TTT layer (LaCT, Zhang et al. 2025, arXiv 2505.23884): SwiGLU fast weights
updated once per chunk of 256…4096 tokens by an inner optimizer, beside a sliding-window softmax
attention branch that keeps the order inside a chunk. docs/design.md §14.5 has the math.

    q, k, v = x Wqkv                                   (one (C, 3C) projection, shared by both)
    attention: RMSNorm(q), RMSNorm(k), RoPE, window attention over H heads (window w = chunk)
    fast weights over H_f heads: q_f, k_f = L2(silu(RMSNorm(q)·s_q + o_q)), likewise k; v_f =
      silu(v); RoPE; η_j = softplus(x_j W_η + b + softplus⁻¹(base_lr)) per head and weight matrix;
      β_j = sigmoid(x_j W_β + b) (learned momentum); z = LaCT(q_f, k_f, v_f) (`ttt.ops.lact`)
    y = (attention + RMSNorm_h(z) · silu(x W_s)) Wo

Causal by default ("apply, then update": a chunk's queries read the fast weights from before the
chunk); `causal=False` is the bidirectional variant a ViT uses (update, then apply; symmetric
window). The decode cache has a fixed size: the fast weights, the open chunk's gradient, the inner
optimizer's state, the open chunk's momentum sum, and the window's KV ring buffers.

Notable choices:
- One (C, 3C) projection instead of three (C, C) ones: one large matmul.
- The fast-weight heads are few and wide (LaCT's proportions: H_f = 4, hidden = head dim), the
  attention heads those of the model; both split the same q, k, v.
- The inner loop runs in float32 (float64 when the layer computes in float64) whatever `dtype`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import common
from ttt.ops import checks, inner_opt, learners, window_attn
from ttt.ops import lact as lact_ops
from ttt.ops.primitives import l2_normalize, rms_norm, rope, scale_features, scale_rows

NORM_EPS = 1e-6
# per-row factors are einsums, per-feature ones `scale_features` (`ttt.ops.primitives`): their
# gradients are then dots, not the reduce-of-a-product kernels XLA:CPU runs many times slower
_rows, _cols = scale_rows, scale_features


def _rms_norm(x, scale):
    return rms_norm(x, scale, NORM_EPS)


def _l2(x):
    return l2_normalize(x, 1e-10)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class LaCTMixer(nn.Module):
    """LaCT sequence mixer: (B, N, C) -> (B, N, C), with a constant-size decode cache (causal).

    width, num_heads: C and the attention heads H (head dim C / H); fw_heads H_f (fast-weight head
    dim d_f = C / H_f); fw_hidden: SwiGLU hidden width / d_f; chunk: tokens per fast-weight update;
    window: attention window (None = chunk, 0 = no attention branch); attn_block: query block of
    the window attention (None: min(window, 128)); causal; inner_opt "sgd" | "momentum" | "muon" |
    "adam" (`ttt.ops.inner_opt.make`); learn_momentum: β per chunk from the tokens (LaCT), else
    inner_beta (momentum, muon; Adam's b1); loss "dot" (LaCT) | "mse"; weight_norm; base_lr: the
    per-token η at zero logits; qk_norm (RMSNorm of q, k); rope, rope_theta, fw_rope (RoPE on the
    fast-weight q, k too); ttt_scale (a learned per-head output scale); init_scale; dtype,
    param_dtype.
    """

    width: int
    num_heads: int
    fw_heads: int = 4
    fw_hidden: float = 1.0
    chunk: int = 2048
    window: int | None = None
    attn_block: int | None = None
    causal: bool = True
    inner_opt: str = "muon"
    learn_momentum: bool = True
    inner_beta: float = 0.9
    loss: str = "dot"
    weight_norm: bool = True
    base_lr: float = 1e-3
    qk_norm: bool = True
    rope: bool = True
    rope_theta: float = 10000.0
    fw_rope: bool = True
    ttt_scale: bool = True
    init_scale: float = common.DEFAULT_INIT_SCALE
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        owner = type(self).__name__
        checks.check_heads(owner, self.width, self.num_heads, even_head_dim=self.rope)
        checks.check_heads(owner + " (fast weights)", self.width, self.fw_heads,
                           even_head_dim=self.rope and self.fw_rope)
        checks.check_int("chunk", self.chunk, 1)
        if self.window is not None:
            checks.check_int("window", self.window, 0)
        if self.attn_block is not None:
            checks.check_int("attn_block", self.attn_block, 1)
        checks.check_choice("inner_opt", self.inner_opt, inner_opt.OPTIMIZERS)
        checks.check_choice("loss", self.loss, learners.LOSSES)
        if not (isinstance(self.fw_hidden, int | float) and self.fw_hidden > 0):
            raise ValueError(f"fw_hidden: expected a positive number, got {self.fw_hidden!r}")
        if not (isinstance(self.base_lr, int | float) and self.base_lr > 0):
            raise ValueError(f"base_lr: expected a positive number, got {self.base_lr!r}")
        super().__post_init__()

    @property
    def attn_window(self) -> int:
        return self.chunk if self.window is None else self.window

    @property
    def momentum(self) -> bool:
        """Whether β comes from the tokens (learned momentum of "momentum" / "muon")."""
        return self.learn_momentum and self.inner_opt in ("momentum", "muon")

    @nn.nowrap
    def make_learner(self) -> learners.Learner:
        return learners.swiglu(self.fw_hidden)

    @nn.nowrap
    def make_inner_opt(self):
        return inner_opt.make(self.inner_opt, beta=None if self.momentum else self.inner_beta)

    # ------------------------------------------------------------------ parameters

    @nn.compact
    def _params(self) -> dict:
        C, Hf, pdt = self.width, self.fw_heads, self.param_dtype
        d = C // Hf
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        normal = nn.initializers.normal(self.init_scale)
        group = lambda name, *specs: common.ParamGroup(specs, pdt, name=name)()
        shapes = jax.eval_shape(lambda key: self.make_learner().init(key, d), jax.random.PRNGKey(0))
        fan_in = lambda name: nn.initializers.normal(shapes[name].shape[0] ** -0.5)
        p = {"wqkv": group("wqkv", ("kernel", normal, (C, 3 * C)))["kernel"],
             "fw": group("fw", *[(n, fan_in(n), (Hf, *shapes[n].shape)) for n in sorted(shapes)]),
             "qk_scale": self.param("qk_scale", ones, (C, 2), pdt),
             "qk_offset": self.param("qk_offset", zeros, (C, 2), pdt),
             "lr": group("lr_proj", ("kernel", normal, (C, 3 * Hf)), ("bias", zeros, (3 * Hf,))),
             "fw_norm": group("fw_norm", ("scale", ones, (d,)))["scale"]}
        if self.qk_norm:
            p["q_norm"] = group("q_norm", ("scale", ones, (C,)))["scale"]
            p["k_norm"] = group("k_norm", ("scale", ones, (C,)))["scale"]
        if self.momentum:
            p["momentum"] = group("momentum_proj", ("kernel", normal, (C, Hf)),
                                  ("bias", zeros, (Hf,)))
        if self.ttt_scale:
            p["ttt_scale"] = group("ttt_scale_proj", ("kernel", normal, (C, Hf)),
                                   ("bias", zeros, (Hf,)))
        p["wo"] = group("wo", ("kernel", normal, (C, C)))["kernel"]
        idt = common.inner_dtype(self.dtype)
        p["fw"] = jax.tree_util.tree_map(lambda w: w.astype(idt), p["fw"])
        return p

    # ------------------------------------------------------------------ pure pieces

    @nn.nowrap
    def _inputs(self, p, x, ttt_lr_mult, pos0=0):
        """x (B, N, C) -> attention q, k, v (B, H, N, C/H), fast-weight q, k, v (B, H_f, N, d_f),
        η {W1, W2, W3: (B, H_f, N)} and β (B, H_f, N) or None."""
        dt, H, Hf = self.dtype, self.num_heads, self.fw_heads
        idt = common.inner_dtype(dt)
        x = x.astype(dt)
        q, k, v = jnp.split(x @ p["wqkv"].astype(dt), 3, axis=-1)  # (B, N, C) each
        q, k, v = q.astype(idt), k.astype(idt), v.astype(idt)
        if self.qk_norm:
            q, k = _rms_norm(q, p["q_norm"].astype(idt)), _rms_norm(k, p["k_norm"].astype(idt))
        t = pos0 + jnp.arange(x.shape[1])  # (N,) absolute positions
        attn = [common.split_heads(y, H) for y in (q, k, v)]
        if self.rope:
            attn[0], attn[1] = (rope(y, t, self.rope_theta) for y in attn[:2])
        scale, offset = p["qk_scale"].astype(idt), p["qk_offset"].astype(idt)
        fq = jax.nn.silu(_cols(q, scale[:, 0]) + offset[:, 0])
        fk = jax.nn.silu(_cols(k, scale[:, 1]) + offset[:, 1])
        fq, fk, fv = (common.split_heads(y, Hf) for y in (fq, fk, jax.nn.silu(v)))
        fq, fk = _l2(fq), _l2(fk)
        if self.rope and self.fw_rope:
            fq, fk = rope(fq, t, self.rope_theta), rope(fk, t, self.rope_theta)
        xi = x.astype(idt)
        logits = xi @ p["lr"]["kernel"].astype(idt) + p["lr"]["bias"].astype(idt)  # (B, N, 3H_f)
        lr = jax.nn.softplus(logits + _inv_softplus(self.base_lr)) * jnp.asarray(ttt_lr_mult, idt)
        lr = jnp.moveaxis(lr.reshape(*lr.shape[:2], Hf, 3), 1, 2)  # (B, H_f, N, 3)
        lr = {name: lr[..., i] for i, name in enumerate(("W1", "W2", "W3"))}
        beta = None
        if self.momentum:
            m = p["momentum"]
            beta = jnp.moveaxis(jax.nn.sigmoid(xi @ m["kernel"].astype(idt)
                                               + m["bias"].astype(idt)), 1, 2)  # (B, H_f, N)
        return attn, (fq, fk, fv), lr, beta

    @nn.nowrap
    def _output(self, p, x, z_attn, z_fw):
        """Attention output (B, H, N, ·) or None, fast-weight output (B, H_f, N, d_f) -> y."""
        dt, idt = self.dtype, common.inner_dtype(self.dtype)
        z = _rms_norm(z_fw, p["fw_norm"].astype(idt))  # per head
        if self.ttt_scale:
            s = p["ttt_scale"]
            gain = jax.nn.silu(x.astype(idt) @ s["kernel"].astype(idt) + s["bias"].astype(idt))
            z = _rows(z, jnp.moveaxis(gain, 1, 2))  # (B, H_f, N, d_f) ⊙ (B, H_f, N)
        y = common.merge_heads(z)
        if z_attn is not None:
            y = y + common.merge_heads(z_attn)
        return y.astype(dt) @ p["wo"].astype(dt)

    @nn.nowrap
    def _fast(self, p, fqkv, lr, beta, **kw):
        fq, fk, fv = fqkv
        norms = lact_ops.unit_norms(p["fw"]) if self.weight_norm else None
        return lact_ops.lact(self.make_learner(), self.make_inner_opt(), p["fw"], fq, fk, fv, lr,
                             chunk=self.chunk, loss=self.loss, momentum=beta,
                             weight_norm_to=norms, causal=self.causal, **kw)

    @nn.nowrap
    def _attend(self, attn):
        if self.attn_window == 0:
            return None
        q, k, v = attn
        return window_attn.window_attention(q, k, v, window=self.attn_window,
                                            causal=self.causal, block=self.attn_block)

    # ------------------------------------------------------------------ public interface

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        """x (B, N, C) -> (y (B, N, C), {}). `ttt_lr_mult` scales η."""
        del train
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        attn, fqkv, lr, beta = self._inputs(p, x, ttt_lr_mult)
        z, _ = self._fast(p, fqkv, lr, beta)
        return self._output(p, x, self._attend(attn), z), {}

    def _no_decode(self):
        if not self.causal:
            raise ValueError("LaCTMixer(causal=False) is non-causal: it has no decode path")

    def init_cache(self, batch_size: int, dtype=None):
        """Empty decode cache: {"W", "G", "opt", "beta", "pos"} (`ttt.ops.lact.LaCTState`) and,
        with the attention branch, the ring buffers {"k", "v"}: (B, H, window, C/H)."""
        self._no_decode()
        p = self._params()
        cache = lact_ops.init_state(self.make_inner_opt(), p["fw"], batch_size)._asdict()
        if self.attn_window:
            shape = (batch_size, self.num_heads, self.attn_window, self.width // self.num_heads)
            idt = common.inner_dtype(dtype or self.dtype)
            cache["k"], cache["v"] = jnp.zeros(shape, idt), jnp.zeros(shape, idt)
        return cache

    def prefill(self, x, *, ttt_lr_mult=1.0):
        """x (B, N, C) -> (y (B, N, C), {}, cache after the N tokens)."""
        self._no_decode()
        checks.check_input(type(self).__name__, x, self.width)
        p = self._params()
        attn, fqkv, lr, beta = self._inputs(p, x, ttt_lr_mult)
        z, state = self._fast(p, fqkv, lr, beta)
        cache = state._asdict()
        if self.attn_window:
            cache["k"], cache["v"] = window_attn.window_cache(attn[1], attn[2], self.attn_window)
        return self._output(p, x, self._attend(attn), z), {}, cache

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        """One token x_t (B, 1, C) -> (y_t (B, 1, C), cache)."""
        self._no_decode()
        keys = lact_ops.LaCTState._fields + (("k", "v") if self.attn_window else ())
        checks.check_step(type(self).__name__, x_t, cache, keys, self.width)
        p = self._params()
        attn, (fq, fk, fv), lr, beta = self._inputs(p, x_t, ttt_lr_mult, cache["pos"])
        state = lact_ops.LaCTState(*(cache[f] for f in lact_ops.LaCTState._fields))
        first = lambda y: y[:, :, 0]  # (B, h, 1, ·) -> (B, h, ·)
        norms = lact_ops.unit_norms(p["fw"]) if self.weight_norm else None
        z_t, state = lact_ops.step(self.make_learner(), self.make_inner_opt(), state, first(fq),
                                   first(fk), first(fv), jax.tree_util.tree_map(first, lr),
                                   chunk=self.chunk, loss=self.loss,
                                   momentum_t=None if beta is None else first(beta),
                                   weight_norm_to=norms)
        new = state._asdict()
        z_attn = None
        if self.attn_window:
            z_a, new["k"], new["v"] = window_attn.window_attention_decode_step(
                cache["k"], cache["v"], *(first(y) for y in attn), cache["pos"])
            z_attn = z_a[:, :, None]
        return self._output(p, x_t, z_attn, z_t[:, :, None]), new
