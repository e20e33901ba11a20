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
- `ttt_naive`:  a Python loop over tokens (tests only; `_ttt_reference.py`).
`ttt_decode_step` is the token-at-a-time primal step used for generation (η_ij = c_i a_j).

Forget gates (docs/design.md §4.11): `log_alpha` (B, H, N) ≤ 0 decays the whole weight pytree W
before each token, a_t = exp(log_alpha_t). With Γ_j = Π_{s≤j} a_s counted from the mini-batch
start, token j's gradient is taken at the decayed start Γ_j W and
    W_i = Γ_i W − Σ_{j≤i} η_ij (Γ_i/Γ_j) g_j,   g_j = ∇_W l(Γ_j W; k_j, v_j);
b = 1 with a bias-free linear learner is the gated delta rule. log_alpha=None runs the ungated code.

Notable choices:
- A final partial mini-batch is padded with zero-η tokens (exact; see `_scan.py`).
- The dual form writes out the per-token gradients w.r.t. each pre-activation Z_l (`_dual.py`):
  the chain rule down the dense layers, the closed-form LayerNorm backward for `ln_residual`'s post
  and `jax.vjp` for any other post, so the outer backward sees no autodiff-of-autodiff graph.
- The dual scan step is `jax.checkpoint`ed: the backward recomputes it from the carried state
  instead of stacking ~30 per-step residual arrays (fewer, cheaper ops per backward step on CPU).
- The carried state keeps W0's dtype (state in float32 while activations run in lower precision).
- The gate's Γ_i/Γ_j ratios are exp of masked differences of cumulative log sums (no overflow, no
  NaN gradients from masked entries) and are folded into η; the fused kernel takes no gate.
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
from ttt.ops._ttt_args import (
    check_dual,
    check_gate_kernel,
    check_log_alpha,
    check_sequence,
    head_shapes,
)
from ttt.ops._ttt_reference import ttt_naive
from ttt.ops.kernels.ttt_dual import auto_selects as kernel_auto_selects
from ttt.ops.kernels.ttt_dual import ttt_dual_pallas
from ttt.ops.kernels.ttt_dual import unsupported as kernel_unsupported
from ttt.ops.learners import Learner, reconstruction_loss

FORMS = ("auto", "dual", "primal")
KERNELS = ("auto", "xla", "pallas")
DUAL_GROUP = 4  # mini-batches per checkpointed group of the dual form (docs/benchmarks.md)


# ----------------------------------------------------------------------------- layout


def decay_matrix(log_alpha, eta_m, b: int):
    """A forget gate per mini-batch: (lg (B, H, M, b), η_ij Γ_i/Γ_j (B, H, M, b, b)).

    lg_i = log Γ_i = Σ_{s≤i} log_alpha_s inside the mini-batch (padded tokens add 0, so they
    repeat the last real Γ); the ratio is exp of the masked difference lg_i − lg_j (j ≤ i).
    """
    la = to_minibatches(log_alpha[..., None].astype(eta_m.dtype), b)[..., 0]  # (B, H, M, b)
    lg = jnp.cumsum(la, axis=-1)
    causal = jnp.tril(jnp.ones((b, b), dtype=bool))  # (b, b): j <= i
    diff = jnp.where(causal, lg[..., :, None] - lg[..., None, :], 0.0)  # (B, H, M, b, b)
    return lg, eta_m * jnp.exp(diff)


def _prepare(learner, W0, q, k, v, eta, mini_batch, fixed, remat_every, unroll, log_alpha=None):
    """Validate, then lay the sequence out as mini-batches: (B, H, M, b, ·) arrays + η matrix,
    and with a gate the cumulative log-decays lg (B, H, M, b) (η then holds η_ij Γ_i/Γ_j)."""
    check_sequence(q, k, v, eta, mini_batch)
    check_log_alpha(log_alpha, q)
    checks.check_int("remat_every", remat_every, 0)
    checks.check_int("unroll", unroll, 1)
    per_sequence = head_shapes(learner, W0, q, v, fixed)
    b = mini_batch
    eta_m = eta_matrix(eta, b)
    lg = None
    if log_alpha is not None:
        lg, eta_m = decay_matrix(log_alpha, eta_m, b)
    xs = (to_minibatches(q, b), to_minibatches(k, b), to_minibatches(v, b), eta_m)
    return per_sequence, xs, lg


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


def _decayed(W, gamma):
    """The weight pytree W scaled by a scalar decay Γ (every leaf, biases included)."""
    return jax.tree_util.tree_map(lambda w: gamma.astype(w.dtype) * w, W)


# ----------------------------------------------------------------------------- primal form


def ttt_primal(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0,
               unroll=1, log_alpha=None):
    """Causal mini-batch TTT from the definition (docs/design.md §4.2); any learner.

    q, k (B, H, N, d_in); v (B, H, N, d_out); eta (B, H, N) or (B, H, N, b);
    W0 pytree with leading H (shared over batch) or (B, H); fixed pytree with leading H or None.
    Returns z (B, H, N, d_out) and the final state W_N (leading (B, H)).
    remat_every = n > 0: jax.checkpoint every group of n mini-batches; unroll: mini-batch steps per
    loop iteration (see `scan_minibatches`). log_alpha (B, H, N) <= 0: a forget gate (§4.11).
    """
    per_sequence, xs, lg = _prepare(learner, W0, q, k, v, eta, mini_batch, fixed, remat_every,
                                    unroll, log_alpha)
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))  # per-token g_j, leaves (b, ...)
    # with a gate g_j is taken at the decayed start Γ_j W
    decayed_grads = jax.vmap(lambda W, f, s, kj, vj: jax.grad(loss)(_decayed(W, s), f, kj, vj),
                             in_axes=(None, None, 0, 0, 0))
    answer = jax.vmap(learner.apply, in_axes=(0, 0, None))  # z_i = f(q_i; W_i)

    def head(W0_h, fixed_h, xs_h):
        def step(W, x):
            q_m, k_m, v_m, eta_m = x[:4]  # (b, d_in), (b, d_in), (b, d_out), (b, b)
            if len(x) == 4:
                g = grads(W, fixed_h, k_m, v_m)
                # W_i = W − Σ_j η_ij g_j for every token i: leaves (b, ...)
                W_i = jax.tree_util.tree_map(
                    lambda w, g_l: w - jnp.einsum("ij,j...->i...", eta_m, g_l), W, g
                )
            else:
                gamma = jnp.exp(x[4])  # (b,) Γ_i; eta_m holds η_ij Γ_i/Γ_j
                g = decayed_grads(W, fixed_h, gamma, k_m, v_m)
                # W_i = Γ_i W − Σ_j η_ij (Γ_i/Γ_j) g_j: leaves (b, ...)
                W_i = jax.tree_util.tree_map(
                    lambda w, g_l: jnp.einsum("i,...->i...", gamma.astype(w.dtype), w)
                    - jnp.einsum("ij,j...->i...", eta_m, g_l), W, g
                )
            z = answer(W_i, q_m, fixed_h)  # (b, d_out)
            W_next = jax.tree_util.tree_map(lambda w: w[-1], W_i)  # row b−1 carries (see _scan)
            return _cast_like(W_next, W), z

        return scan_minibatches(step, W0_h, xs_h, remat_every, unroll)

    xs = xs if lg is None else (*xs, lg)
    W_N, z = _map_heads(head, W0, fixed, per_sequence, xs)  # z (B, H, M, b, d_out)
    return from_minibatches(z, q.shape[2]), W_N


# ----------------------------------------------------------------------------- dual form


def ttt_dual(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0, unroll=1,
             kernel="auto", log_alpha=None):
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

    log_alpha (B, H, N) <= 0: a forget gate (§4.11), XLA only (kernel "auto" runs XLA with it).
    """
    per_sequence, (q_m, k_m, v_m, eta_m), lg = _prepare(
        learner, W0, q, k, v, eta, mini_batch, fixed, remat_every, unroll, log_alpha
    )
    check_dual(learner, W0)
    checks.check_choice("kernel", kernel, KERNELS)
    check_gate_kernel(kernel, log_alpha)
    B = q.shape[0]
    if not per_sequence:  # (H, ...) -> (B, H, ...): every sequence carries its own state
        W0 = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    if lg is None and _pallas(kernel, learner, W0, q, v, mini_batch):
        return ttt_dual_pallas(learner, W0, fixed, q, k, v, eta_m)
    if len(learner.dense) > 1:  # deeper chains: the whole step in the scan (measured faster)
        return _dual_steps(learner, W0, fixed, (q_m, k_m, v_m, eta_m), q.shape[2], remat_every,
                           unroll, lg)
    major = lambda x: jnp.moveaxis(x, 2, 0)  # (B, H, M, ...) -> (M, B, H, ...): scan order
    xs = tuple(map(major, (q_m, k_m, v_m, eta_m) if lg is None else (q_m, k_m, v_m, eta_m, lg)))
    # fixed broadcast over B: its gradient is summed over the batch once, after the loop (on a
    # device mesh a collective over the batch axes), not in every mini-batch
    fixed = jax.tree_util.tree_map(lambda f: jnp.broadcast_to(f, (B, *jnp.shape(f))), fixed)
    run = functools.partial(_dual_minibatches, learner, fixed, unroll)
    # always checkpointed groups (remat_every, else DUAL_GROUP): the backward stores one state
    # per group and recomputes the group, instead of stacking a d × d state per mini-batch
    W_N, z = scan_groups(run, W0, xs, remat_every or DUAL_GROUP)
    z = jnp.moveaxis(z, 0, 2)  # (M, B, H, b, d_out) -> (B, H, M, b, d_out)
    return from_minibatches(z, q.shape[2]), W_N


def _dual_steps(learner, W0, fixed, xs, n, remat_every, unroll, lg=None):
    """The dual form with every mini-batch's whole step (keys, queries, update) in one scan step,
    jax.checkpoint'ed (the backward recomputes a step from its carried state). W0 leaves (B, H,
    ...); xs (q, k, v, eta) in (B, H, M, b, ·) layout; lg (B, H, M, b) a gate's log Γ or None.
    Returns (z (B, H, n, d_out), W_N)."""
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
            kq_m, v_in, eta_mb, A1_m = x[:4]  # (2b, d_in), (b, d_out), (b, b), (b, b)
            lg_m = x[4] if len(x) == 5 else None  # (b,) log Γ of a gate
            k_in, q_in = kq_m[:b], kq_m[b:]
            Z1 = kq_m @ W[w1]  # (2b, d_in) @ (d_in, d_1) -> (2b, d_1): keys and queries at once
            if b1 is not None:
                Z1 = Z1 + W[b1]
            scale = None
            if lg_m is not None:  # rows at the decayed weights Γ W: keys' Γ_j, queries' Γ_i
                scale = jnp.exp(lg_m)
                Z1 = _dual.rows(jnp.concatenate([scale, scale]), Z1)
            G, Xk = _dual.key_gradients(learner, W, fixed_h, k_in, v_in, Z1[:b], scale)
            z = _dual.query_side(learner, W, fixed_h, q_in, eta_mb, A1_m, G, Xk, Z1=Z1[b:],
                                 scale=scale)
            W_next, _ = _dual.key_step(learner, W, fixed_h, k_in, v_in, eta_mb[-1], (G, Xk),
                                       lg=lg_m)
            return W_next, z

        step_remat = jax.checkpoint(step, prevent_cse=False)
        return scan_minibatches(step_remat, W0_h, xs_h, remat_every, unroll)

    xs = (kq, v_m, eta_m, A1) if lg is None else (kq, v_m, eta_m, A1, lg)
    W_N, z = _map_heads(head, W0, fixed, True, xs)  # z (B, H, M, b, ·)
    return from_minibatches(z, n), W_N


def _pallas(kernel, learner, W0, q, v, mini_batch) -> bool:
    """Whether `kernel` selects the fused kernel for this case (ValueError if "pallas" cannot)."""
    if kernel == "xla":
        return False
    reason = kernel_unsupported(learner, W0, q.shape[-1], v.shape[-1], mini_batch, q.dtype)
    if kernel == "pallas" and reason is not None:
        raise ValueError(f"kernel='pallas': {reason}; use kernel='xla' or 'auto'")
    return reason is None and (kernel == "pallas" or kernel_auto_selects())


def _dual_minibatches(learner, fixed, unroll, W0, xs):
    """The dual form over mini-batch-major inputs (M, B, H, ...) from W0 (B, H, ...) -> (W_N, z);
    fixed leaves (B, H, ...)."""
    q_t, k_t, v_t, eta_t = xs[:4]  # (M, B, H, b, d_in) ×2, (M, B, H, b, d_out), (M, B, H, b, b)
    lg_t = xs[4] if len(xs) == 5 else None  # (M, B, H, b): a gate's log Γ
    e = eta_t[..., -1, :]  # (M, B, H, b): the η row that carries the state
    Ws, W_N, G, Xk = _dual.state_scan(learner, unroll, W0, fixed, k_t, v_t, e, lg_t)
    # layer 1's b×b matrix needs no state: (M, B, H, b, d) x (M, B, H, b, d) -> (M, B, H, b, b)
    A1 = eta_t * jnp.einsum("...id,...jd->...ij", q_t, k_t)
    if learner.dense[0][1] is not None:
        A1 = A1 + eta_t  # the bias's gradient enters every row with weight η_ij
    if lg_t is not None:
        answer = lambda W, f, q_, eta_, A_, G_, X_, lg_: _dual.query_side(
            learner, W, f, q_, eta_, A_, G_, X_, scale=jnp.exp(lg_))
        args = (Ws, fixed, q_t, eta_t, A1, G, Xk, lg_t)
    else:
        answer = lambda W, f, q_, eta_, A_, G_, X_: _dual.query_side(learner, W, f, q_, eta_, A_,
                                                                     G_, X_)
        args = (Ws, fixed, q_t, eta_t, A1, G, Xk)
    axes = (0,) * len(args)
    over_h = jax.vmap(answer, in_axes=axes)
    over_bh = jax.vmap(over_h, in_axes=axes)
    over_all = jax.vmap(over_bh, in_axes=(0, None, *axes[2:]))  # over M
    return W_N, over_all(*args)


# ----------------------------------------------------------------------------- API


def ttt(learner, W0, q, k, v, eta, *, mini_batch=16, fixed=None, remat_every=0, unroll=1,
        form="auto", kernel="auto", log_alpha=None):
    """Causal mini-batch TTT; form "auto" runs the dual form when the learner has a dense chain.

    form: "auto" | "dual" | "primal"; kernel: the dual form's "auto" | "xla" | "pallas" (see
    ttt_dual; the primal form is XLA only). Shapes and results as ttt_primal. log_alpha
    (B, H, N) <= 0: a forget gate (§4.11; not with kernel "pallas").
    """
    checks.check_choice("form", form, FORMS)
    checks.check_choice("kernel", kernel, KERNELS)
    check_gate_kernel(kernel, log_alpha)
    if form == "auto":
        form = "dual" if getattr(learner, "dense", None) is not None else "primal"
    kwargs = dict(mini_batch=mini_batch, fixed=fixed, remat_every=remat_every, unroll=unroll)
    if log_alpha is not None:
        kwargs["log_alpha"] = log_alpha
    if form == "dual":
        return ttt_dual(learner, W0, q, k, v, eta, kernel=kernel, **kwargs)
    return ttt_primal(learner, W0, q, k, v, eta, **kwargs)


def ttt_decode_step(learner, W_start, G_acc, q_t, k_t, v_t, a_t, c_t, *, fixed=None,
                    log_alpha_t=None):
    """One decoding token of causal TTT when η_ij = c_i · a_j (true of TTT-LM, docs/design.md §4.6).

    W_start, G_acc: pytrees with leading (B, H) (state at the mini-batch start; accumulated
    gradient of the mini-batch so far); q_t, k_t (B, H, d_in); v_t (B, H, d_out); a_t, c_t (B, H).
        G_acc_new = G_acc + a_t ∇_W l(W_start; k_t, v_t);   z_t = f(q_t; W_start − c_t G_acc_new)
    Returns (z_t (B, H, d_out), G_acc_new). To close a mini-batch the caller sets
    W_start ← W_start − c_last G_acc_new and G_acc ← 0.

    log_alpha_t (B, H) <= 0, a forget gate (§4.11): W_start then holds the mini-batch's start state
    decayed to the previous token (Γ_{t−1} W) and G_acc the decayed sum Σ_j a_j (Γ_{t−1}/Γ_j) g_j.
    Both decay by α_t = exp(log_alpha_t) first, then the step above runs (so g_t is taken at Γ_t W);
    returns (z_t, G_acc_new, α_t W_start), the last being the next call's W_start.
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
    if log_alpha_t is not None:
        checks.check_shape("log_alpha_t", log_alpha_t, (B, H), "(B, H)", like="q_t")
        checks.check_floating("log_alpha_t", log_alpha_t)
        checks.check_log_decay("log_alpha_t", log_alpha_t)
    checks.check_same_dtype(q_t=q_t, k_t=k_t, v_t=v_t)
    seq = lambda x: x[:, :, None]  # (B, H, d) -> (B, H, 1, d): reuse the sequence checks
    if not head_shapes(learner, W_start, seq(q_t), seq(v_t), fixed, what="W_start"):
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
    if log_alpha_t is None:
        return over_b(W_start, G_acc, fixed, q_t, k_t, v_t, a_t, c_t)
    alpha = jnp.exp(log_alpha_t)  # (B, H)
    decay = lambda w: jnp.einsum("bh,bh...->bh...", alpha.astype(w.dtype), w)
    W_dec = jax.tree_util.tree_map(decay, W_start)
    z_t, G_new = over_b(W_dec, jax.tree_util.tree_map(decay, G_acc), fixed, q_t, k_t, v_t, a_t,
                        c_t)
    return z_t, G_new, W_dec


__all__ = ["Learner", "ttt", "ttt_decode_step", "ttt_dual", "ttt_naive", "ttt_primal"]
