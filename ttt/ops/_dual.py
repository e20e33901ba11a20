"""Per-token pre-activation gradients of a dense-chain learner, written out (docs/design.md §4.3).

For one mini-batch of keys the dual form needs G_l,j = ∂l_j/∂Z_l,j, l_j = ½‖f(k_j; W) − v_j‖², at
every dense layer l. Taking them with `jax.grad` inside the scan step makes the outer backward
transpose an autodiff-of-autodiff graph; writing the chain rule out keeps the step to a few plain
array ops, which is what sets the time of the (overhead-bound) mini-batch scan.

- Down the chain: G_l = (G_{l+1} W_{l+1}ᵀ) ⊙ σ'(Z_l), with σ' from a forward-mode derivative of the
  learner's elementwise activation (any activation).
- At the output: the residual LayerNorm post of `ln_residual` gets its closed-form backward; any
  other `post` goes through `jax.vjp`, so every learner keeps the primal form's results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt.ops.primitives import layer_norm_backward, layer_norm_stats


def key_gradients(learner, W, fixed, k_in, v_in, Z1k):
    """Per-token G_l (b, d_{l+1}) of every dense layer and the key inputs X_l (b, d_l), layers 2..

    Z1k (b, d_1): layer 1's pre-activations of the keys k_in (b, d_in); v_in (b, d_out) targets.
    A learner with `ln_eps` set (the residual LayerNorm post) gets the closed-form LN backward;
    any other `post` goes through jax.vjp.
    """
    dense = learner.dense
    Zs, Xs = [Z1k], []
    Z = Z1k
    for w_name, b_name in dense[1:]:
        X = learner.activation(Z) if learner.activation is not None else Z
        Xs.append(X)
        Z = X @ W[w_name]  # (b, d_l) @ (d_l, d_{l+1}) -> (b, d_{l+1})
        if b_name is not None:
            Z = Z + W[b_name]
        Zs.append(Z)
    if learner.post is None:
        G = Z - v_in  # (b, d_out)
    elif learner.ln_eps is not None:
        # f = k + LN(Z)·scale + bias, so f − v = x̂·scale + bias − (v − k), and G is the LN
        # backward of that residual times the scale
        cols = lambda x, c: jnp.einsum("bd,d->bd", x, c)  # per-feature product, as a dot's input
        xhat, rho = layer_norm_stats(Z, learner.ln_eps)  # (b, d), (b,)
        r = cols(xhat, fixed["scale"]) + fixed["bias"] + k_in - v_in  # (b, d)
        G = layer_norm_backward(cols(r, fixed["scale"]), xhat, rho).astype(Z.dtype)
    else:
        out, pullback = jax.vjp(lambda Z_: learner.post(k_in, Z_, fixed), Z)
        (G,) = pullback(out - v_in)
    Gs = [G]
    for l in range(len(dense) - 1, 0, -1):
        # back through layer l+1's weights and the activation at Z_l: (b, d_{l+1}) @ (d_{l+1}, d_l)
        back = Gs[0] @ W[dense[l][0]].T
        if learner.activation is not None:
            _, slope = jax.jvp(learner.activation, (Zs[l - 1],), (jnp.ones_like(Zs[l - 1]),))
            back = back * slope
        Gs.insert(0, back)
    return Gs, Xs
