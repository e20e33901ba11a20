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
from ttt.ops._scan import (
    eta_matrix,
    from_minibatches,
    scan_groups,
    scan_minibatches,
    to_minibatches,
)
from ttt.ops.kernels.ttt_dual import ttt_dual_pallas
from ttt.ops.kernels.ttt_dual import unsupported as kernel_unsupported
from ttt.ops.learners import Learner, reconstruction_loss

FORMS = ("auto", "dual", "primal")
KERNELS = ("auto", "xla", "pallas")
DUAL_GROUP = 4  # mini-batches per checkpointed group of the dual form (docs/benchmarks.md)


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
    checks.check_qkv(q, k, v)
    B, H, N, _ = q.shape
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


def ttt_dual(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0, unroll=1,
             kernel="auto"):
    """Causal mini-batch TTT in the dual form (TTT-LM §2.7); same contract and results as primal.

    For a dense chain Z_l = X_l W_l + b_l (activation between layers, optional `post` after), per
    mini-batch with key activations X_l^k and per-token pre-activation gradients G_l:
        Z_l(q) = X_l^q W_l + b_l − (η ⊙ tril(X_l^q X_l^kᵀ)) G_l − tril(η) G_l
        W_l ← W_l − X_l^kᵀ (η_last ⊙ G_l),   b_l ← b_l − Σ_j η_last,j G_l,j.
    Shapes as ttt_primal. Raises ValueError for a learner without `dense`.

    kernel: "xla" | "pallas" | "auto". "pallas" runs the fused kernel of `ttt.ops.kernels.ttt_dual`
    (compiled on a GPU, interpreted on a CPU; it keeps its own state checkpoints, so remat_every and
    unroll do not apply); "auto" picks it on a GPU when it supports the shape, else XLA.

    Layout for speed (docs/design.md §4.3; the loop over mini-batches is sequential, so only what
    needs the state runs inside it): the mini-batches run in checkpointed groups of DUAL_GROUP
    (or remat_every). In a group, a scan (`_dual.state_scan`) runs the keys' side alone — G_l,
    X_l^k and the state update, two small matmuls per layer — and stacks the group's states; the
    queries' side (`_dual.query_side`: X_l^q W_l, the b×b matrices, `post`) then runs for the
    group's mini-batches at once as batched matmuls. The state scan's backward is written out (a
    reverse scan linearised at the stacked states, no autodiff of a checkpointed step); the group
    checkpoint keeps one state per group in memory (the backward recomputes a group's forward)
    instead of a d × d state per mini-batch.
    """
    per_sequence, (q_m, k_m, v_m, eta_m) = _prepare(
        learner, W0, q, k, v, eta, mini_batch, fixed, remat_every, unroll
    )
    _check_dual(learner, W0)
    checks.check_choice("kernel", kernel, KERNELS)
    B = q.shape[0]
    if not per_sequence:  # (H, ...) -> (B, H, ...): every sequence carries its own state
        W0 = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    if _pallas(kernel, learner, W0, q, v, mini_batch):
        return ttt_dual_pallas(learner, W0, fixed, q, k, v, eta_m)
    if len(learner.dense) > 1:  # deeper chains: the whole step in the scan (measured faster)
        return _dual_steps(learner, W0, fixed, (q_m, k_m, v_m, eta_m), q.shape[2], remat_every,
                           unroll)
    major = lambda x: jnp.moveaxis(x, 2, 0)  # (B, H, M, ...) -> (M, B, H, ...): scan order
    xs = tuple(map(major, (q_m, k_m, v_m, eta_m)))
    # fixed broadcast over B: its gradient is summed over the batch once, after the loop (on a
    # device mesh a collective over the batch axes), not in every mini-batch
    fixed = jax.tree_util.tree_map(lambda f: jnp.broadcast_to(f, (B, *jnp.shape(f))), fixed)
    run = functools.partial(_dual_minibatches, learner, fixed, unroll)
    # always checkpointed groups (remat_every, else DUAL_GROUP): the backward stores one state
    # per group and recomputes the group, instead of stacking a d × d state per mini-batch
    W_N, z = scan_groups(run, W0, xs, remat_every or DUAL_GROUP)
    z = jnp.moveaxis(z, 0, 2)  # (M, B, H, b, d_out) -> (B, H, M, b, d_out)
    return from_minibatches(z, q.shape[2]), W_N


def _dual_steps(learner, W0, fixed, xs, n, remat_every, unroll):
    """The dual form with every mini-batch's whole step (keys, queries, update) in one scan step,
    jax.checkpoint'ed (the backward recomputes a step from its carried state). W0 leaves (B, H,
    ...); xs (q, k, v, eta) in (B, H, M, b, ·) layout. Returns (z (B, H, n, d_out), W_N)."""
    q_m, k_m, v_m, eta_m = xs
    dense, b = learner.dense, q_m.shape[-2]
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
            Z1 = kq_m @ W[w1]  # (2b, d_in) @ (d_in, d_1) -> (2b, d_1): keys and queries at once
            if b1 is not None:
                Z1 = Z1 + W[b1]
            G, Xk = _dual.key_gradients(learner, W, fixed_h, k_in, v_in, Z1[:b])
            z = _dual.query_side(learner, W, fixed_h, q_in, eta_mb, A1_m, G, Xk, Z1=Z1[b:])
            W_next, _ = _dual.key_step(learner, W, fixed_h, k_in, v_in, eta_mb[-1], (G, Xk))
            return W_next, z

        step_remat = jax.checkpoint(step, prevent_cse=False)
        return scan_minibatches(step_remat, W0_h, xs_h, remat_every, unroll)

    W_N, z = _map_heads(head, W0, fixed, True, (kq, v_m, eta_m, A1))  # z (B, H, M, b, ·)
    return from_minibatches(z, n), W_N


def _pallas(kernel, learner, W0, q, v, mini_batch) -> bool:
    """Whether `kernel` selects the fused kernel for this case (ValueError if "pallas" cannot)."""
    if kernel == "xla":
        return False
    reason = kernel_unsupported(learner, W0, q.shape[-1], v.shape[-1], mini_batch, q.dtype)
    if kernel == "pallas" and reason is not None:
        raise ValueError(f"kernel='pallas': {reason}; use kernel='xla' or 'auto'")
    return reason is None and (kernel == "pallas" or jax.default_backend() == "gpu")


def _dual_minibatches(learner, fixed, unroll, W0, xs):
    """The dual form over mini-batch-major inputs (M, B, H, ...) from W0 (B, H, ...) -> (W_N, z);
    fixed leaves (B, H, ...)."""
    q_t, k_t, v_t, eta_t = xs  # (M, B, H, b, d_in) ×2, (M, B, H, b, d_out), (M, B, H, b, b)
    e = eta_t[..., -1, :]  # (M, B, H, b): the η row that carries the state
    Ws, W_N, G, Xk = _dual.state_scan(learner, unroll, W0, fixed, k_t, v_t, e)
    # layer 1's b×b matrix needs no state: (M, B, H, b, d) x (M, B, H, b, d) -> (M, B, H, b, b)
    A1 = eta_t * jnp.einsum("...id,...jd->...ij", q_t, k_t)
    if learner.dense[0][1] is not None:
        A1 = A1 + eta_t  # the bias's gradient enters every row with weight η_ij
    answer = lambda W, f, q_, eta_, A_, G_, X_: _dual.query_side(learner, W, f, q_, eta_, A_, G_,
                                                                 X_)
    over_h = jax.vmap(answer, in_axes=(0, 0, 0, 0, 0, 0, 0))
    over_bh = jax.vmap(over_h, in_axes=(0, 0, 0, 0, 0, 0, 0))
    over_all = jax.vmap(over_bh, in_axes=(0, None, 0, 0, 0, 0, 0))  # over M
    return W_N, over_all(Ws, fixed, q_t, eta_t, A1, G, Xk)


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
        form="auto", kernel="auto"):
    """Causal mini-batch TTT; form "auto" runs the dual form when the learner has a dense chain.

    form: "auto" | "dual" | "primal"; kernel: the dual form's "auto" | "xla" | "pallas" (see
    ttt_dual; the primal form is XLA only). Shapes and results as ttt_primal.
    """
    checks.check_choice("form", form, FORMS)
    checks.check_choice("kernel", kernel, KERNELS)
    if form == "auto":
        form = "dual" if getattr(learner, "dense", None) is not None else "primal"
    kwargs = dict(mini_batch=mini_batch, fixed=fixed, remat_every=remat_every, unroll=unroll)
    if form == "dual":
        return ttt_dual(learner, W0, q, k, v, eta, kernel=kernel, **kwargs)
    return ttt_primal(learner, W0, q, k, v, eta, **kwargs)


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
