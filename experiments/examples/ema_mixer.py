"""A mixer of your own: a gated exponential moving average (EMA) over the tokens.

Per channel c, with a learned decay λ_c = sigmoid(θ_c) ∈ (0, 1):

    s_t = λ ⊙ s_{t−1} + (1 − λ) ⊙ (x_t W_v),   y_t = (s_t ⊙ sigmoid(x_t W_g)) W_o

Registered as "ema": `model.mixer=ema` (or `experiments/lm.py:ema,...` after
`--import=experiments/examples/ema_mixer.py`) builds an LM of it; it decodes (init_cache /
prefill / step carry s, C floats per sequence), so `ttt.sample` works on its runs. Its state size
and FLOPs are stated for reports; both are optional.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttt.layers import MixerSpec, register_mixer


class EMAMixer(nn.Module):
    """(B, N, C) -> (B, N, C); `num_heads` is accepted for the interface and unused."""

    width: int
    num_heads: int
    decay_init: float = 2.0  # θ at init: λ = sigmoid(2) ≈ 0.88
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dense = lambda: nn.Dense(self.width, use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        self.wv, self.wg, self.wo = dense(), dense(), dense()
        self.theta = self.param("theta", nn.initializers.constant(self.decay_init),
                                (self.width,), self.param_dtype)

    def _run(self, x, s0):
        lam = jax.nn.sigmoid(self.theta.astype(jnp.float32))
        u = (1.0 - lam) * self.wv(x).astype(jnp.float32)  # (B, N, C)

        def body(s, u_t):  # one token: s_t = λ s_{t−1} + u_t
            s = lam * s + u_t
            return s, s

        s_last, states = jax.lax.scan(body, s0, jnp.swapaxes(u, 0, 1))
        gate = jax.nn.sigmoid(self.wg(x))
        y = self.wo((jnp.swapaxes(states, 0, 1) * gate).astype(self.dtype))
        return y, s_last

    def _zeros(self, x):
        return jnp.zeros((x.shape[0], self.width), jnp.float32)

    def __call__(self, x, *, ttt_lr_mult=1.0, train=False):
        del ttt_lr_mult, train
        return self._run(x, self._zeros(x))[0], {}

    def init_cache(self, batch_size: int, dtype=None):
        return {"s": jnp.zeros((batch_size, self.width), jnp.float32)}

    def prefill(self, x, *, ttt_lr_mult=1.0):
        y, s = self._run(x, self._zeros(x))
        return y, {}, {"s": s}

    def step(self, x_t, cache, *, ttt_lr_mult=1.0):
        y, s = self._run(x_t, cache["s"])
        return y, {"s": s}


register_mixer(MixerSpec(
    "ema", EMAMixer, causal=True,
    description="gated exponential moving average per channel (an extension example)",
    state_size=lambda C, H, attrs, N: C,
    flops=lambda N, C, H, attrs: 3 * 2.0 * N * C * C + 4.0 * N * C,
), replace=True)
