"""Causal mini-batch TTT (TTT-LM, arXiv 2407.04620 §2.4–2.7; docs/design.md §4).

Per sequence and head the hidden state is the weight pytree W of an inner learner f(x; W). Tokens
are cut into mini-batches of b. Inside a mini-batch every gradient is taken at its starting state W:
    g_j = ∇_W l(W; k_j, v_j),  l = ½‖f(k_j; W) − v_j‖²,
    W_i = W − Σ_{j≤i} η_ij g_j,   z_i = f(q_i; W_i),
and W_b (the last row of η) is carried to the next mini-batch.

Three forms, held equal by tests/test_ttt_ops.py:
- `ttt_primal`: the definition, `lax.scan` over mini-batches, `vmap(grad)` over tokens; any learner.
- `ttt_dual`:   the fast path for dense-chain learners (paper §2.7): per layer
                Z_l(q) = X_q W + b − (η ⊙ tril(X_q X_kᵀ)) G − tril(η) G, never materialising W_i.
- `ttt_naive`:  a Python loop over tokens (tests only).
`ttt_decode_step` is the token-at-a-time primal step used for generation (η_ij = c_i a_j).

Notable choices:
- A final partial mini-batch is padded with zero-η tokens (exact; see `_scan.py`).
- The dual form writes out the per-token gradients w.r.t. each pre-activation Z_l (`_dual.py`):
  the chain rule down the dense layers, the closed-form LayerNorm backward for `ln_residual`'s post
  and `jax.vjp` for any other post, so the outer backward sees no autodiff-of-autodiff graph.
- The dual scan step is `jax.checkpoint`ed: the backward recomputes it from the carried state
  instead of stacking ~30 per-step residual arrays (fewer, cheaper ops per backward step on CPU).
- The carried state keeps W0's dtype (state in float32 while activations run in lower precision).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt.ops import _dual, checks
from ttt.ops._scan import eta_matrix, from_minibatches, scan_minibatches, to_minibatches
from ttt.ops.learners import Learner, reconstruction_loss

FORMS = ("auto", "dual", "primal")


# ----------------------------------------------------------------------------- argument checks


def _head_shapes(learner, W0, q, v, fixed, what="W0"):
    """Check W0/fixed against the learner; return True when W0 leads with (B, H), False for (H,)."""
    B, H, _, d_in = q.shape
    per_sequence = checks.inner_state_layout(learner, W0, B, H, d_in, what)
    if fixed is not None:
        checks.check_leading("fixed", fixed, (H,), "(H,)")
    lead = 2 if per_sequence else 1
    W_head = jax.tree_util.tree_map(
        lambda w: jax.ShapeDtypeStruct(jnp.shape(w)[lead:], jnp.result_type(w)), W0
    )
    fixed_head = jax.tree_util.tree_map(
        lambda f: jax.ShapeDtypeStruct(jnp.shape(f)[1:], jnp.result_type(f)), fixed
    )
    token = jax.ShapeDtypeStruct((d_in,), q.dtype)
    try:
        out = jax.eval_shape(learner.apply, W_head, token, fixed_head)
    except Exception as err:  # re-raised in words: what was passed, not an XLA trace
        raise ValueError(
            f"learner {learner.name}: apply(W, x, fixed) fails on one token of width {d_in} "
            f"with W0/fixed as given: {err}"
        ) from err
    if tuple(out.shape) != (v.shape[-1],):
        raise ValueError(
            f"v: learner {learner.name} maps d_in={d_in} to {tuple(out.shape)}, but v has "
            f"d_out={v.shape[-1]}"
        )
    return per_sequence


def _check_sequence(q, k, v, eta, mini_batch):
    """Check q, k, v, eta, mini_batch (contract of ttt_primal/ttt_dual)."""
    checks.check_int("mini_batch", mini_batch, 1)
    checks.check_rank("q", q, 4, "(B, H, N, d_in)")
    B, H, N, d_in = q.shape
    if N < 1:
        raise ValueError(f"q: expected at least one token (N >= 1), got shape {q.shape}")
    checks.check_shape("k", k, (B, H, N, d_in), "(B, H, N, d_in)", like="q")
    checks.check_shape("v", v, (B, H, N, None), "(B, H, N, d_out)", like="q")
    if jnp.ndim(eta) == 3:
        checks.check_shape("eta", eta, (B, H, N), "(B, H, N)", like="q")
    elif jnp.ndim(eta) == 4:
        checks.check_shape("eta", eta, (B, H, N, mini_batch), "(B, H, N, b)", like="q, mini_batch")
    else:
        raise ValueError(
            f"eta: expected (B, H, N) per-token or (B, H, N, b) per-row learning rates, "
            f"got shape {jnp.shape(eta)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("eta", eta)):
        checks.check_floating(name, x)
    checks.check_same_dtype(q=q, k=k, v=v)


def _check_dual(learner, W0):
    """The dual form needs a dense-chain learner whose W holds exactly the chain's layers."""
    if getattr(learner, "dense", None) is None:
        raise ValueError(
            f"ttt_dual: learner {learner.name!r} has no dense-chain description (learner.dense "
            f"is None); use ttt_primal, or ttt(..., form='auto')"
        )
    names = {n for layer in learner.dense for n in layer if n is not None}
    if not isinstance(W0, dict) or set(W0) != names:
        raise ValueError(
            f"ttt_dual: learner {learner.name!r} declares dense layers {learner.dense}, but W0 has "
            f"keys {sorted(W0) if isinstance(W0, dict) else type(W0).__name__}"
        )


def _prepare(learner, W0, q, k, v, eta, mini_batch, fixed, remat_every, unroll):
    """Validate, then lay the sequence out as mini-batches: (B, H, M, b, ·) arrays + η matrix."""
    _check_sequence(q, k, v, eta, mini_batch)
    checks.check_int("remat_every", remat_every, 0)
    checks.check_int("unroll", unroll, 1)
    per_sequence = _head_shapes(learner, W0, q, v, fixed)
    b = mini_batch
    xs = (to_minibatches(q, b), to_minibatches(k, b), to_minibatches(v, b), eta_matrix(eta, b))
    return per_sequence, xs


def _map_heads(head_fn, W0, fixed, per_sequence, xs):
    """vmap `head_fn(W, fixed, xs)` over H (all args), then over B (xs, fixed, and W0 if
    per-sequence). `fixed` is broadcast over B first, so its gradient is summed over the batch
    once after the mini-batch loop, not in every iteration (on a device mesh that sum is a
    collective over the batch axes)."""
    B = jax.tree_util.tree_leaves(xs)[0].shape[0]
    fixed = jax.tree_util.tree_map(lambda f: jnp.broadcast_to(f, (B, *jnp.shape(f))), fixed)
    over_h = jax.vmap(head_fn, in_axes=(0, 0, 0))
    over_b = jax.vmap(over_h, in_axes=(0 if per_sequence else None, 0, 0))
    return over_b(W0, fixed, xs)


def _cast_like(tree, ref):
    return jax.tree_util.tree_map(lambda x, r: x.astype(r.dtype), tree, ref)


# ----------------------------------------------------------------------------- primal form


def ttt_primal(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0,
               unroll=1):
    """Causal mini-batch TTT from the definition (docs/design.md §4.2); any learner.

    q, k (B, H, N, d_in); v (B, H, N, d_out); eta (B, H, N) or (B, H, N, b);
    W0 pytree with leading H (shared over batch) or (B, H); fixed pytree with leading H or None.
    Returns z (B, H, N, d_out) and the final state W_N (leading (B, H)).
    remat_every = n > 0: jax.checkpoint every group of n mini-batches; unroll: mini-batch steps per
    loop iteration (see `scan_minibatches`).
    """
    per_sequence, xs = _prepare(learner, W0, q, k, v, eta, mini_batch, fixed, remat_every, unroll)
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))  # per-token g_j, leaves (b, ...)
    answer = jax.vmap(learner.apply, in_axes=(0, 0, None))  # z_i = f(q_i; W_i)

    def head(W0_h, fixed_h, xs_h):
        def step(W, x):
            q_m, k_m, v_m, eta_m = x  # (b, d_in), (b, d_in), (b, d_out), (b, b)
            g = grads(W, fixed_h, k_m, v_m)
            # W_i = W − Σ_j η_ij g_j for every token i: leaves (b, ...)
            W_i = jax.tree_util.tree_map(
                lambda w, g_l: w - jnp.einsum("ij,j...->i...", eta_m, g_l), W, g
            )
            z = answer(W_i, q_m, fixed_h)  # (b, d_out)
            W_next = jax.tree_util.tree_map(lambda w: w[-1], W_i)  # row b−1 carries (see _scan)
            return _cast_like(W_next, W), z

        return scan_minibatches(step, W0_h, xs_h, remat_every, unroll)

    W_N, z = _map_heads(head, W0, fixed, per_sequence, xs)  # z (B, H, M, b, d_out)
    return from_minibatches(z, q.shape[2]), W_N


# ----------------------------------------------------------------------------- dual form


def ttt_dual(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0, unroll=1):
    """Causal mini-batch TTT in the dual form (TTT-LM §2.7); same contract and results as primal.

    For a dense chain Z_l = X_l W_l + b_l (activation between layers, optional `post` after), per
    mini-batch with key activations X_l^k and per-token pre-activation gradients G_l:
        Z_l(q) = X_l^q W_l + b_l − (η ⊙ tril(X_l^q X_l^kᵀ)) G_l − tril(η) G_l
        W_l ← W_l − X_l^kᵀ (η_last ⊙ G_l),   b_l ← b_l − Σ_j η_last,j G_l,j.
    Shapes as ttt_primal. Raises ValueError for a learner without `dense`.

    Layout for speed (the scan over mini-batches is sequential, so its body is kept small):
    layer 1's inputs are q and k themselves, so its b×b matrix A_1 = η ⊙ (tril(X_qX_kᵀ) + 1_bias)
    needs no state and is formed for all mini-batches at once, outside the scan; inside, keys and
    queries go through W_1 as one (2b, d) matmul, and the bias term joins A_1 G_1 in one matmul.
    """
    per_sequence, (q_m, k_m, v_m, eta_m) = _prepare(
        learner, W0, q, k, v, eta, mini_batch, fixed, remat_every, unroll
    )
    _check_dual(learner, W0)
    dense = learner.dense
    act = learner.activation if learner.activation is not None else (lambda x: x)
    b = mini_batch
    w1, b1 = dense[0]
    # (B, H, M, b, d) x (B, H, M, b, d) -> (B, H, M, b, b); η is already causally masked
    A1 = eta_m * jnp.einsum("...id,...jd->...ij", q_m, k_m)
    if b1 is not None:
        A1 = A1 + eta_m  # the bias's gradient enters every row with weight η_ij
    kq = jnp.concatenate([k_m, q_m], axis=-2)  # (B, H, M, 2b, d_in): keys then queries

    def head(W0_h, fixed_h, xs_h):
        def step(W, x):
            kq_m, v_in, eta_mb, A1_m = x  # (2b, d_in), (b, d_out), (b, b), (b, b)
            k_in, q_in = kq_m[:b], kq_m[b:]
            Z1 = kq_m @ W[w1]  # (2b, d_in) @ (d_in, d_1) -> (2b, d_1)
            if b1 is not None:
                Z1 = Z1 + W[b1]
            G, Xk = _dual.key_gradients(learner, W, fixed_h, k_in, v_in, Z1[:b])
            Xk = [k_in, *Xk]
            eta_last = eta_mb[-1]  # (b,): the row that carries the state
            W_next = dict(W)
            Z = Z1[b:] - A1_m @ G[0]  # (b, b) @ (b, d_1) -> (b, d_1)
            for l, (w_name, b_name) in enumerate(dense):
                if l > 0:
                    X = act(Z)  # (b, d_l): layer l's input at the answer states
                    # η_ij X_l(q_i)·X_l(k_j): (b, d_l) @ (d_l, b) -> (b, b)
                    A = eta_mb * (X @ Xk[l].T)
                    if b_name is not None:
                        A = A + eta_mb
                    Z = X @ W[w_name] - A @ G[l]  # (b, b) @ (b, d_{l+1}) -> (b, d_{l+1})
                    if b_name is not None:
                        Z = Z + W[b_name]
                # (b, d_l)ᵀ @ (b, d_{l+1}) -> (d_l, d_{l+1})
                W_next[w_name] = W[w_name] - Xk[l].T @ jnp.einsum("b,bd->bd", eta_last, G[l])
                if b_name is not None:
                    W_next[b_name] = W[b_name] - eta_last @ G[l]  # (b,) @ (b, d_{l+1})
            z = learner.post(q_in, Z, fixed_h) if learner.post is not None else Z
            return _cast_like(W_next, W), z

        # recompute the step in the backward from the carried W (see module docstring)
        step_remat = jax.checkpoint(step, prevent_cse=False)
        return scan_minibatches(step_remat, W0_h, xs_h, remat_every, unroll)

    W_N, z = _map_heads(head, W0, fixed, per_sequence, (kq, v_m, eta_m, A1))  # z (B, H, M, b, ·)
    return from_minibatches(z, q.shape[2]), W_N


# ----------------------------------------------------------------------------- reference and API


@functools.partial(jax.jit, static_argnums=0)
def _naive_grads(learner, W, fixed, k_blk, v_blk):
    """g_j = ∇_W l(W; k_j, v_j) of a block: k_blk (B, H, r, d_in) -> leaves (B, H, r, ...)."""
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    per_head = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))
    return jax.vmap(jax.vmap(per_head))(W, fixed, k_blk, v_blk)


@functools.partial(jax.jit, static_argnums=0)
def _naive_answer(learner, W, g, lr, q_t, fixed):
    """W_t = W − Σ_j lr_j g_j (lr (B, H, r), zero for future j); z_t = f(q_t; W_t) (B, H, d_out)."""
    W_t = jax.tree_util.tree_map(
        # (B, H, r) · (B, H, r, ...) -> (B, H, ...)
        lambda w, g_l: (w - jnp.einsum("bhj,bhj...->bh...", lr, g_l)).astype(w.dtype), W, g
    )
    return W_t, jax.vmap(jax.vmap(learner.apply))(W_t, q_t, fixed)


def ttt_naive(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None):
    """Token-by-token reference (tests only): materialises every W_i from the definition.

    Same shapes and results as ttt_primal; a Python loop over tokens, vectorised over (B, H) only.
    Reads η straight from the contract's layouts (it shares no layout code with the fast forms).
    """
    _check_sequence(q, k, v, eta, mini_batch)
    per_sequence = _head_shapes(learner, W0, q, v, fixed)
    B, H, N, _ = q.shape
    b = mini_batch
    to_bh = lambda w: jnp.broadcast_to(w, (B, *w.shape))  # (H, ...) -> (B, H, ...)
    W = W0 if per_sequence else jax.tree_util.tree_map(to_bh, W0)
    fix = jax.tree_util.tree_map(to_bh, fixed)
    zs = []
    for start in range(0, N, b):
        r = min(b, N - start)  # tokens in this mini-batch
        g = _naive_grads(learner, W, fix, k[:, :, start : start + r], v[:, :, start : start + r])
        for i in range(r):
            t = start + i
            row = eta[:, :, start : start + r] if eta.ndim == 3 else eta[:, :, t, :r]  # (B, H, r)
            lr = jnp.where(jnp.arange(r) <= i, row, 0.0)  # only j <= i: causal incl. diagonal
            W_t, z_t = _naive_answer(learner, W, g, lr, q[:, :, t], fix)
            zs.append(z_t)
        W = W_t  # the last token of the mini-batch carries the state
    return jnp.stack(zs, axis=2), W  # (B, H, N, d_out)


def ttt(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0, unroll=1,
        form="auto"):
    """Causal mini-batch TTT; form "auto" runs the dual form when the learner has a dense chain.

    form: "auto" | "dual" | "primal". Shapes and results as ttt_primal.
    """
    checks.check_choice("form", form, FORMS)
    if form == "auto":
        form = "dual" if getattr(learner, "dense", None) is not None else "primal"
    fn = ttt_dual if form == "dual" else ttt_primal
    kwargs = dict(mini_batch=mini_batch, fixed=fixed, remat_every=remat_every, unroll=unroll)
    return fn(learner, W0, q, k, v, eta, **kwargs)


def ttt_decode_step(learner, W_start, G_acc, q_t, k_t, v_t, a_t, c_t, *, fixed=None):
    """One decoding token of causal TTT when η_ij = c_i · a_j (true of TTT-LM, docs/design.md §4.6).

    W_start, G_acc: pytrees with leading (B, H) (state at the mini-batch start; accumulated
    gradient of the mini-batch so far); q_t, k_t (B, H, d_in); v_t (B, H, d_out); a_t, c_t (B, H).
        G_acc_new = G_acc + a_t ∇_W l(W_start; k_t, v_t);   z_t = f(q_t; W_start − c_t G_acc_new)
    Returns (z_t (B, H, d_out), G_acc_new). To close a mini-batch the caller sets
    W_start ← W_start − c_last G_acc_new and G_acc ← 0.
    """
    checks.check_rank("q_t", q_t, 3, "(B, H, d_in)")
    B, H, d_in = q_t.shape
    checks.check_shape("k_t", k_t, (B, H, d_in), "(B, H, d_in)", like="q_t")
    checks.check_rank("v_t", v_t, 3, "(B, H, d_out)")
    checks.check_shape("v_t", v_t, (B, H, None), "(B, H, d_out)", like="q_t")
    checks.check_shape("a_t", a_t, (B, H), "(B, H)", like="q_t")
    checks.check_shape("c_t", c_t, (B, H), "(B, H)", like="q_t")
    for name, x in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("a_t", a_t), ("c_t", c_t)):
        checks.check_floating(name, x)
    checks.check_same_dtype(q_t=q_t, k_t=k_t, v_t=v_t)
    seq = lambda x: x[:, :, None]  # (B, H, d) -> (B, H, 1, d): reuse the sequence checks
    if not _head_shapes(learner, W_start, seq(q_t), seq(v_t), fixed, what="W_start"):
        raise ValueError("W_start: expected leading (B, H) axes (a per-sequence state), got (H,)")
    leaves = jax.tree_util.tree_leaves
    if jax.tree_util.tree_structure(G_acc) != jax.tree_util.tree_structure(W_start) or any(
        jnp.shape(g) != jnp.shape(w) for g, w in zip(leaves(G_acc), leaves(W_start), strict=True)
    ):
        raise ValueError("G_acc: expected the same pytree structure and shapes as W_start")

    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)

    def head(W, G, f, q1, k1, v1, a, c):
        g = jax.grad(loss)(W, f, k1, v1)
        G_new = jax.tree_util.tree_map(lambda G_l, g_l: (G_l + a * g_l).astype(G_l.dtype), G, g)
        W_t = jax.tree_util.tree_map(lambda w, G_l: w - c * G_l, W, G_new)
        return learner.apply(W_t, q1, f), G_new

    over_h = jax.vmap(head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0))
    over_b = jax.vmap(over_h, in_axes=(0, 0, None, 0, 0, 0, 0, 0))
    return over_b(W_start, G_acc, fixed, q_t, k_t, v_t, a_t, c_t)


__all__ = ["Learner", "ttt", "ttt_decode_step", "ttt_dual", "ttt_naive", "ttt_primal"]
