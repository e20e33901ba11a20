"""Inner learners f(x; W): the models whose weights W are the TTT hidden state (docs/design.md §3).

A learner is a pure (init, apply) pair over a plain parameter dict for ONE head. The inner loops in
`ttt.ops.ttt` and `ttt.ops.mttt` only ever call `init`, `apply` and `jax.grad` of
`reconstruction_loss`, so any pytree-valued learner works with the primal and naive loops.

The optional `dense` / `activation` / `post` fields describe the learner as a chain of dense layers
    Z_1 = X_1 W_1 + b_1,  X_{l+1} = activation(Z_l),  f(x) = post(x, Z_L, fixed)
which is what the dual form (TTT-LM §2.7) needs to answer queries without materialising W_i.

Notable choices:
- Weights are stored as (d_in, d_out) and applied as x W (row vectors), like flax Dense.
- LayerNorm is `ttt.ops.primitives.layer_norm` (flax's statistics, eps 1e-6: parity with
  ttt-lm-jax).
- GELU is the tanh approximation (parity with ttt-lm-jax).
- In `ln_residual` the LN scale/bias are `fixed`: outer-loop parameters the inner loop never trains.
- `swiglu` (LaCT's fast weights) is not a dense chain (its two first layers are multiplied), so the
  dual form does not take it; it carries a closed-form `grads` instead (docs/design.md §14.3).
- The inner loss is a choice (`inner_loss`): the squared error ½‖f(k) − v‖² of TTT-LM and MTTT, or
  LaCT's negative dot product −f(k)·v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ttt.ops.primitives import layer_norm


class Learner(NamedTuple):
    """An inner model f(x; W) as pure functions over a per-head parameter dict.

    init(key, d_in) -> W           pytree for one head (no leading H axis)
    apply(W, x, fixed) -> y        x (..., d_in) -> y (..., d_out); `fixed` = untrained per-head
                                   params (e.g. LN scale/bias) or None
    dense                          ((W name, b name or None), ...) in chain order, or None when the
                                   dual form cannot handle this learner
    activation                     elementwise nonlinearity between dense layers (None = identity)
    post(x_in, y, fixed) -> out    applied after the dense chain (None = identity)
    ln_eps                         when `post` is the residual LayerNorm of `ln_residual`, its eps
                                   (the dual form then uses the closed-form LN backward); else None
    grads(W, fixed, k, v, lr, loss) the weighted gradient Σ_j lr_j ∇_W l(W; k_j, v_j) of a block of
                                   tokens written out (see `weighted_grads`), or None: jax.vjp
    loss(y, v) -> scalar           the learner's own inner loss of ONE token, y = f(k; W), replacing
                                   ½‖y − v‖²; or None. The dual form, the fused kernel and a
                                   closed-form `grads` assume the squared error, so a learner with
                                   its own loss runs the primal form (set dense=None)
    """

    name: str
    init: Callable
    apply: Callable
    dense: tuple | None = None
    activation: Callable | None = None
    post: Callable | None = None
    ln_eps: float | None = None
    grads: Callable | None = None
    loss: Callable | None = None


LOSSES = ("mse", "dot")


def gelu_tanh(x):
    """GELU, tanh approximation (as in ttt-lm-jax)."""
    return jax.nn.gelu(x, approximate=True)


def init_fixed_ln(d) -> dict:
    """Per-head LN params of `ln_residual` at init: {"scale": ones(d), "bias": zeros(d)}."""
    return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}


def _dense_chain_apply(dense, activation, W, x):
    """Run the dense chain Z_l = X_l W_l + b_l with `activation` between layers; x (..., d_in)."""
    h = x
    for idx, (w_name, b_name) in enumerate(dense):
        if idx > 0 and activation is not None:
            h = activation(h)
        h = h @ W[w_name]  # (..., d_l) @ (d_l, d_{l+1}) -> (..., d_{l+1})
        if b_name is not None:
            h = h + W[b_name]
    return h


def linear(d_out=None, bias=True, init_scale=0.02) -> Learner:
    """f(x) = x W1 + b1; W1 (d_in, d_out) ~ N(0, σ=init_scale), b1 = 0; d_out = d_in if None."""
    dense = (("W1", "b1" if bias else None),)

    def init(key, d_in):
        width = d_in if d_out is None else d_out
        W = {"W1": init_scale * jax.random.normal(key, (d_in, width))}
        if bias:
            W["b1"] = jnp.zeros((width,))
        return W

    def apply(W, x, fixed=None):
        del fixed
        return _dense_chain_apply(dense, None, W, x)

    return Learner("linear", init, apply, dense=dense, activation=None, post=None)


def mlp(factor=4, bias=True, init_scale=0.02) -> Learner:
    """f(x) = gelu_tanh(x W1 + b1) W2 + b2; W1 (d_in, factor·d_in), W2 (factor·d_in, d_in)."""
    dense = (("W1", "b1" if bias else None), ("W2", "b2" if bias else None))

    def init(key, d_in):
        hidden = factor * d_in
        k1, k2 = jax.random.split(key)
        W = {
            "W1": init_scale * jax.random.normal(k1, (d_in, hidden)),
            "W2": init_scale * jax.random.normal(k2, (hidden, d_in)),
        }
        if bias:
            W["b1"] = jnp.zeros((hidden,))
            W["b2"] = jnp.zeros((d_in,))
        return W

    def apply(W, x, fixed=None):
        del fixed
        return _dense_chain_apply(dense, gelu_tanh, W, x)

    return Learner("mlp", init, apply, dense=dense, activation=gelu_tanh, post=None)


def ln_residual(inner: Learner, eps=1e-6) -> Learner:
    """f(x) = x + LN(inner(x)) with fixed = {"scale": (d,), "bias": (d,)} (docs/design.md §3.3).

    Because of the residual, ½‖f(k) − v‖² = ½‖LN(inner(k)) − (v − k)‖²: the inner model learns to
    reconstruct v − k. `inner` must map d -> d. The dual form is available when `inner` is a plain
    dense chain (no `post` of its own).
    """

    def post(x_in, y, fixed):
        return x_in + layer_norm(y, fixed["scale"], fixed["bias"], eps)

    def apply(W, x, fixed):
        if fixed is None:
            raise ValueError(
                f"ln_residual({inner.name}): `fixed` must hold the LN params "
                '{"scale": (d,), "bias": (d,)}; build them with init_fixed_ln(d)'
            )
        return post(x, inner.apply(W, x, None), fixed)

    dual_ok = inner.dense is not None and inner.post is None and inner.loss is None
    return Learner(
        f"ln_residual({inner.name})",
        inner.init,
        apply,
        dense=inner.dense if dual_ok else None,
        activation=inner.activation if dual_ok else None,
        post=post if dual_ok else None,
        ln_eps=float(eps) if dual_ok else None,
        loss=inner.loss,
    )


def reconstruction_loss(learner: Learner, W, fixed, k, v):
    """l(W; k, v) = ½‖f(k; W) − v‖² summed over features, for ONE token: k (d_in,), v (d_out,);
    the learner's own `loss(f(k; W), v)` instead when it has one."""
    y = learner.apply(W, k, fixed)  # (d_out,)
    if learner.loss is not None:
        return learner.loss(y, v)
    r = y - v
    return 0.5 * jnp.sum(r * r)


def inner_loss(learner: Learner, W, fixed, k, v, loss: str = "mse"):
    """l(W; k, v) for ONE token: "mse" ½‖f(k; W) − v‖² (`reconstruction_loss`) or "dot" −f(k; W)·v
    (LaCT: minimising it moves f(k) towards the direction of v, with no pull on its norm)."""
    if loss == "mse":
        return reconstruction_loss(learner, W, fixed, k, v)
    return -jnp.sum(learner.apply(W, k, fixed) * v)


def _loss_cotangent(out, v, loss):
    """∂l_j/∂f(k_j) of every token: f(k) − v (mse) or −v (dot); out, v (n, d_out)."""
    return out - v if loss == "mse" else -v


def weighted_grads(learner: Learner, W, fixed, k, v, lr, loss: str = "mse"):
    """Σ_j lr_j ∇_W l(W; k_j, v_j) over a block of tokens, all gradients taken at the same W.

    k (n, d_in); v (n, d_out); lr (n,) shared by every leaf of W, or a dict with W's keys of (n,)
    arrays (one learning rate per weight matrix and token, as LaCT's); loss "mse" | "dot".
    Uses the learner's closed form (`Learner.grads`) when it has one; otherwise one jax.vjp of the
    per-token losses with lr (or each leaf's lr) as the cotangent.
    """
    if learner.grads is not None:
        return learner.grads(W, fixed, k, v, lr, loss)
    per_token = jax.vmap(lambda W_, kj, vj: inner_loss(learner, W_, fixed, kj, vj, loss),
                         in_axes=(None, 0, 0))
    _, pullback = jax.vjp(lambda W_: per_token(W_, k, v), W)  # losses (n,)
    if not isinstance(lr, dict):
        return pullback(lr.astype(k.dtype))[0]
    # one backward per leaf, each keeping its own leaf (XLA drops the rest of each backward)
    return {name: pullback(lr[name].astype(k.dtype))[0][name] for name in W}


def silu_slope(z):
    """d silu(z)/dz = σ(z) (1 + z (1 − σ(z)))."""
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def swiglu(hidden_factor: float = 1.0, init_scale: float | None = None) -> Learner:
    """LaCT's fast weights f(x) = (silu(x W1) ⊙ (x W3)) W2 (no biases): W1, W3 (d_in, h), W2
    (h, d_in), h = hidden_factor·d_in. init_scale None: N(0, 1/fan_in) entries, as LaCT.

    Its `grads` writes the backward out: with Z = k W1, Y = k W3, H = silu(Z) ⊙ Y, f = H W2 and
    D = ∂l/∂f per token (f(k) − v for "mse", −v for "dot"):
        ∂/∂W2 = Hᵀ (λ ⊙ D),  E = D W2ᵀ,  ∂/∂W3 = kᵀ (λ ⊙ E ⊙ silu(Z)),
        ∂/∂W1 = kᵀ (λ ⊙ E ⊙ Y ⊙ silu'(Z)),
    so a block of n tokens costs six (n × d × h) matmuls and the per-token λ scale rows, never
    materialising per-token gradients.
    """

    def init(key, d_in):
        h = max(int(round(hidden_factor * d_in)), 1)
        std_in = init_scale if init_scale is not None else d_in**-0.5
        std_h = init_scale if init_scale is not None else h**-0.5
        k1, k2, k3 = jax.random.split(key, 3)
        return {"W1": std_in * jax.random.normal(k1, (d_in, h)),
                "W2": std_h * jax.random.normal(k2, (h, d_in)),
                "W3": std_in * jax.random.normal(k3, (d_in, h))}

    def gate_and_up(W, x):
        """(x W1, x W3) as one matmul with [W1 | W3] (d_in, 2h): one large product, not two."""
        h = W["W1"].shape[-1]
        ZY = x @ jnp.concatenate([W["W1"], W["W3"]], axis=-1)  # (..., 2h)
        return ZY[..., :h], ZY[..., h:]

    def apply(W, x, fixed=None):
        del fixed
        Z, Y = gate_and_up(W, x)
        return (jax.nn.silu(Z) * Y) @ W["W2"]  # (..., h) @ (h, d_in)

    def grads(W, fixed, k, v, lr, loss):
        del fixed
        lam = lr if isinstance(lr, dict) else {"W1": lr, "W2": lr, "W3": lr}
        rows = lambda name, x: jnp.einsum("n,nd->nd", lam[name].astype(x.dtype), x)
        Z, Y = gate_and_up(W, k)  # (n, h) each
        s = jax.nn.silu(Z)
        H = s * Y  # (n, h)
        D = _loss_cotangent(H @ W["W2"] if loss == "mse" else None, v, loss)  # (n, d_out)
        E = D @ W["W2"].T  # (n, d_out) @ (d_out, h) -> (n, h)
        # [∂W1 | ∂W3] = kᵀ [λ1 ⊙ E ⊙ Y ⊙ silu'(Z) | λ3 ⊙ E ⊙ silu(Z)]: (d_in, n) @ (n, 2h)
        g13 = k.T @ jnp.concatenate([rows("W1", E * Y * silu_slope(Z)), rows("W3", E * s)],
                                    axis=-1)
        h = Z.shape[-1]
        return {"W1": g13[:, :h], "W2": H.T @ rows("W2", D), "W3": g13[:, h:]}

    return Learner("swiglu", init, apply, grads=grads)


# --- the learner registry: the names a layer's `learner=` accepts -------------------------------

# name -> make(*, bias, init_scale, mlp_factor) -> Learner (a factory may ignore any option)
_REGISTRY: dict[str, Callable[..., Learner]] = {
    "linear": lambda *, bias, init_scale, mlp_factor: linear(bias=bias, init_scale=init_scale),
    "mlp": lambda *, bias, init_scale, mlp_factor: mlp(factor=mlp_factor, bias=bias,
                                                       init_scale=init_scale),
}


def register_learner(name: str, make: Callable[..., Learner], *, replace: bool = False) -> None:
    """Make `name` a learner the TTT and MTTT layers accept (`learner=name`, in configs too).

    make(*, bias, init_scale, mlp_factor) -> Learner builds the inner model for one head with the
    layer's options (a factory may ignore those it has no use for). Registering a taken name is a
    ValueError unless replace=True (the shipped "linear" and "mlp" can never be replaced)."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"register_learner: name {name!r} must be an identifier")
    if not callable(make):
        raise ValueError(f"register_learner({name!r}): make must be callable, got {make!r}")
    if name in ("linear", "mlp") or (name in _REGISTRY and not replace):
        raise ValueError(f"register_learner: {name!r} is already a learner; pick another name"
                         + ("" if name in ("linear", "mlp") else " or pass replace=True"))
    _REGISTRY[name] = make


def learner_names() -> tuple[str, ...]:
    """The registered learner names, shipped ones first."""
    return tuple(_REGISTRY)


def build_learner(learner: str | Learner, *, bias: bool = True, init_scale: float = 0.02,
                  mlp_factor: int = 4) -> Learner:
    """A registered name built with the layer's options, or a `Learner` returned as it is."""
    if isinstance(learner, Learner):
        return learner
    if learner not in _REGISTRY:
        raise ValueError(f"learner {learner!r}: expected one of {', '.join(_REGISTRY)} "
                         "(register_learner adds names) or a ttt.ops.Learner")
    built = _REGISTRY[learner](bias=bias, init_scale=init_scale, mlp_factor=mlp_factor)
    if not isinstance(built, Learner):
        raise ValueError(f"learner {learner!r}: its factory returned {type(built).__name__}, "
                         "not a ttt.ops.Learner")
    return built
