"""Per-token pre-activation gradients of a dense-chain learner, written out (docs/design.md §4.3).

For one mini-batch of keys the dual form needs G_l,j = ∂l_j/∂Z_l,j, l_j = ½‖f(k_j; W) − v_j‖², at
every dense layer l. Taking them with `jax.grad` inside the scan step makes the outer backward
transpose an autodiff-of-autodiff graph; writing the chain rule out keeps the step to a few plain
array ops, which is what sets the time of the (overhead-bound) mini-batch scan.

- Down the chain: G_l = (G_{l+1} W_{l+1}ᵀ) ⊙ σ'(Z_l), with σ' from a forward-mode derivative of the
  learner's elementwise activation (any activation).
- At the output: the residual LayerNorm post of `ln_residual` gets its closed-form backward; any
  other `post` goes through `jax.vjp`, so every learner keeps the primal form's results.
- A forget gate (docs/design.md §4.11) enters as per-row scales: token j's key forward runs at the
  decayed weights Γ_j W, so every dense layer's pre-activation (and the backward through its
  weights) is scaled by Γ_j; the queries' base term X W + b by Γ_i; the Γ_i/Γ_j ratios are
  already folded into η by the caller. Without a gate the ungated code runs unchanged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt.ops.primitives import layer_norm_backward, layer_norm_stats


def rows(scale, x):
    """scale (b,) times the rows of x (b, d), as a dot's input."""
    return jnp.einsum("b,bd->bd", scale.astype(x.dtype), x)


def key_gradients(learner, W, fixed, k_in, v_in, Z1k, scale=None):
    """Per-token G_l (b, d_{l+1}) of every dense layer and the key inputs X_l (b, d_l), layers 2..

    Z1k (b, d_1): layer 1's pre-activations of the keys k_in (b, d_in); v_in (b, d_out) targets.
    A learner with `ln_eps` set (the residual LayerNorm post) gets the closed-form LN backward;
    any other `post` goes through jax.vjp. scale (b,): token j's weights are Γ_j W (a forget
    gate; Z1k must already be scaled), else None.
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
        if scale is not None:
            Z = rows(scale, Z)  # Z_j = X_j (Γ_j W) + Γ_j b
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
        if scale is not None:
            back = rows(scale, back)  # through the decayed weights Γ_j W_{l+1}
        if learner.activation is not None:
            _, slope = jax.jvp(learner.activation, (Zs[l - 1],), (jnp.ones_like(Zs[l - 1]),))
            back = back * slope
        Gs.insert(0, back)
    return Gs, Xs


# ----------------------------------------------------------------------------- lean dual form


def key_step(learner, W, fixed, k_in, v_in, e, grads=None, lg=None):
    """One mini-batch of the state recurrence for one head (the part that needs the state).

    k_in (b, d_in), v_in (b, d_out), e (b,) the η row that carries the state (η_{b−1, j}).
    Returns (W_next, (G, Xk)): G the per-layer pre-activation gradients (b, d_{l+1}) and Xk the
    key activations of layers 2.. (b, d_l); everything the query side needs besides W itself.
    grads: (G, Xk) when the caller already has them. lg (b,): log Γ_j, the cumulative log-decay
    from the mini-batch start (a forget gate; e then holds η_{b−1, j} Γ_{b−1}/Γ_j), else None:
        W_next = Γ_{b−1} W − X_kᵀ (e ⊙ G).
    """
    scale = None if lg is None else jnp.exp(lg)  # (b,) Γ_j
    if grads is None:
        w1, b1 = learner.dense[0]
        Z1 = k_in @ W[w1]  # (b, d_in) @ (d_in, d_1) -> (b, d_1)
        if b1 is not None:
            Z1 = Z1 + W[b1]
        if scale is not None:
            Z1 = rows(scale, Z1)
        grads = key_gradients(learner, W, fixed, k_in, v_in, Z1, scale)
    G, Xk = grads
    if scale is not None:  # the start state decayed to the last token
        W = jax.tree_util.tree_map(lambda w: (scale[-1] * w).astype(w.dtype), W)
    W_next = dict(W)
    for X, G_l, (w_name, b_name) in zip([k_in, *Xk], G, learner.dense, strict=True):
        # (b, d_l)ᵀ @ (b, d_{l+1}) -> (d_l, d_{l+1}); e scales the rows of G_l
        W_next[w_name] = W[w_name] - X.T @ jnp.einsum("b,bd->bd", e, G_l)
        if b_name is not None:
            W_next[b_name] = W[b_name] - e @ G_l  # (b,) @ (b, d_{l+1})
    W_next = jax.tree_util.tree_map(lambda x, w: x.astype(w.dtype), W_next, W)
    return W_next, (tuple(G), tuple(Xk))


def _heads(learner):
    """key_step vmapped over (B, H): W and fixed leaves (B, H, ...); an optional lg (B, H, b)."""
    one = lambda W, f, k, v, e, *lg: key_step(learner, W, f, k, v, e, lg=lg[0] if lg else None)
    return jax.vmap(jax.vmap(one))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def state_scan(learner, unroll, W0, fixed, k, v, e, lg=None):
    """The state recurrence over all mini-batches, with a hand-written backward.

    W0 and fixed leaves (B, H, ...) (fixed may be None); k (M, B, H, b, d_in), v (M, B, H, b,
    d_out), e (M, B, H, b); lg (M, B, H, b) the cumulative log-decays of a forget gate or None.
    Returns (Ws, W_N, G, Xk): Ws the state at the start of every mini-batch (leaves (M, B, H,
    ...)), W_N the final state, G and Xk as `key_step`, stacked (M, B, H, b, ·).
    """
    return _state_scan_fwd(learner, unroll, W0, fixed, k, v, e, lg)[0]


def _state_scan_fwd(learner, unroll, W0, fixed, k, v, e, lg=None):
    step_all = _heads(learner)

    def step(W, x):
        W_next, ys = step_all(W, fixed, *x)
        return W_next, (W, ys)

    xs = (k, v, e) if lg is None else (k, v, e, lg)
    W_N, (Ws, (G, Xk)) = jax.lax.scan(step, W0, xs, unroll=unroll)
    return (Ws, W_N, G, Xk), (Ws, fixed, xs)


def _state_scan_bwd(learner, unroll, res, cts):
    """Reverse scan: the cotangent of the state walks back through each mini-batch's key_step
    (linearised at the saved state of that mini-batch: no recomputation of earlier ones)."""
    Ws, fixed, xs = res  # xs: (k, v, e) or (k, v, e, lg)
    dWs, dW_N, dG, dXk = cts
    step_all = _heads(learner)

    def step(carry, x):
        dW_next, dfixed = carry
        W, x_m, dWs_m, dG_m, dXk_m = x
        _, pullback = jax.vjp(lambda W, f, *x_: step_all(W, f, *x_), W, fixed, *x_m)
        dW, df, *dx = pullback((dW_next, (dG_m, dXk_m)))
        dW = jax.tree_util.tree_map(jnp.add, dW, dWs_m)  # Ws[m] is W itself, an output
        dfixed = jax.tree_util.tree_map(jnp.add, dfixed, df)
        return (dW, dfixed), tuple(dx)

    zero_fixed = jax.tree_util.tree_map(jnp.zeros_like, fixed)
    (dW0, dfixed), dxs = jax.lax.scan(
        step, (dW_N, zero_fixed), (Ws, xs, dWs, dG, dXk), reverse=True, unroll=unroll)
    return (dW0, dfixed, *dxs) if len(dxs) == 4 else (dW0, dfixed, *dxs, None)


state_scan.defvjp(_state_scan_fwd, _state_scan_bwd)


def query_side(learner, W, fixed, q_in, eta, A1, G, Xk, Z1=None, scale=None, base=None):
    """Answers of one mini-batch of one head from its starting state and the key side's G, Xk.

    q_in (b, d_in); eta (b, b) masked; A1 (b, b) = η ⊙ (q kᵀ) (+ η with a bias); Z1: the queries'
    X_1 W_1 + b_1 when the caller already has it. Returns z (b, d_out):
    Z_l(q) = X_l^q W_l + b_l − (η ⊙ (X_l^q X_l^kᵀ)) G_l − η G_l (bias), then `post`.
    scale (b,): a forget gate's Γ_i, which scales the X_l^q W_l + b_l term (Z1, when given, must
    already be scaled; η must hold η_ij Γ_i/Γ_j), else None.
    base: a function (l, X_l^q) -> (b, d_{l+1}) that replaces the X_l^q W_l + b_l term (Titans'
    γ ⊙ (X W + b) + m ⊙ (X S + s)); None: that term (times Γ_i with a `scale`).
    """
    if base is None:
        def base(l, X):  # X W + b, or Γ_i (X W + b) under a forget gate
            w_name, b_name = learner.dense[l]
            Z = X @ W[w_name]  # (b, d_l) @ (d_l, d_{l+1})
            if b_name is not None:
                Z = Z + W[b_name]
            return Z if scale is None else rows(scale, Z)

    act = learner.activation if learner.activation is not None else (lambda x: x)
    Z = None
    for l, (_, b_name) in enumerate(learner.dense):
        if l == 0:
            X, A = q_in, A1
        else:
            X = act(Z)  # (b, d_l): layer l's input at the answer states
            A = eta * (X @ Xk[l - 1].T)  # (b, d_l) @ (d_l, b) -> (b, b)
            if b_name is not None:
                A = A + eta
        start = Z1 if l == 0 and Z1 is not None else base(l, X)
        Z = start - A @ G[l]  # − (b, b) @ (b, d_{l+1})
    return learner.post(q_in, Z, fixed) if learner.post is not None else Z
