"""A learner of your own: a residual two-layer MLP with a Huber inner loss.

    f(x; W) = x + gelu(x W1 + b1) W2,   l(W; k, v) = Σ_i huber(f(k)_i − v_i),  δ = 1

Registered as "residual_mlp": a TTT or MTTT layer takes it as `learner="residual_mlp"`, on the
command line too (`--import=experiments/examples/residual_mlp.py
--config.model.mixer_kwargs.learner=residual_mlp`). It is not a plain dense chain (the residual,
its own loss), so `dense` stays None and the layers run the primal form, which differentiates
whatever `apply` and `loss` compute.
"""

import jax
import jax.numpy as jnp

from ttt.ops import Learner, register_learner

DELTA = 1.0  # where the Huber loss turns from quadratic to linear


def huber(y, v):
    """Σ_i huber(y_i − v_i): ½ r² for |r| ≤ δ, δ (|r| − ½ δ) beyond (robust to outlier values)."""
    r = jnp.abs(y - v)
    return jnp.sum(jnp.where(r <= DELTA, 0.5 * r * r, DELTA * (r - 0.5 * DELTA)))


def residual_mlp(*, bias: bool = True, init_scale: float = 0.02, mlp_factor: int = 4) -> Learner:
    """The learner for one head; the layer passes its bias / init_scale / mlp_factor options."""

    def init(key, d):
        k1, k2 = jax.random.split(key)
        h = mlp_factor * d
        W = {"W1": init_scale * jax.random.normal(k1, (d, h)),
             "W2": init_scale * jax.random.normal(k2, (h, d))}
        if bias:
            W["b1"] = jnp.zeros((h,))
        return W

    def apply(W, x, fixed=None):
        z = x @ W["W1"] + W.get("b1", 0.0)
        return x + jax.nn.gelu(z, approximate=True) @ W["W2"]

    return Learner("residual_mlp", init, apply, loss=huber)


# replace=True: importing this file a second time (a test, a notebook) re-registers the same name
register_learner("residual_mlp", residual_mlp, replace=True)
