"""Large-chunk test-time training (LaCT, Zhang et al. 2025, arXiv 2505.23884; docs/design.md §14.4).

Per sequence and head the fast weights W of a learner (LaCT: SwiGLU) are updated once per chunk of
n tokens (n = 256 … 4096), so the inner loop is a few large matmuls instead of a long chain of
small steps. For chunk m with tokens C_m, per-token learning rates λ_j (one per weight matrix
allowed) and the inner optimizer tx (`ttt.ops.inner_opt`, unit learning rate):

    ĝ_m = Σ_{j∈C_m} λ_j ∇_W l(W_m; k_j, v_j),          (u, s) ← tx.update(ĝ_m, s, W_m; β_m),
    W_{m+1} = WN(W_m + u),                              β_m = mean_{j∈C_m} momentum_j (optional)

where l is the squared error or LaCT's −f(k)·v and WN (optional) rescales every output unit's
weight vector to its norm in W_0 (LaCT's weight normalisation).

- causal ("apply, then update"): chunk m's queries read W_m, the weights before the chunk, so the
  first chunk reads W_0 only; a final partial chunk is answered and its gradient kept open in the
  state (it updates W when the chunk completes, token by token in `step`).
- non-causal ("update, then apply"): the chunks update W in order, a final partial chunk too,
  then every query reads the final weights; one chunk of N and one SGD step is MTTT with T = 1.

`lact` is the fast path (`lax.scan` over chunks, the learner's closed-form weighted gradient);
`step` the one-token decode step of the causal form; `naive` a token loop materialising every
per-token gradient, for the tests.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ttt.ops import checks, inner_opt
from ttt.ops.learners import LOSSES, inner_loss, weighted_grads

WN_EPS = 1e-5


class LaCTState(NamedTuple):
    """Decode state of causal LaCT; leaves lead with (B, H).

    W: fast weights after the last complete chunk. G: ĝ over the tokens of the open chunk (zero at
    a chunk boundary). opt: the inner optimizer's state. beta: Σ momentum_j over the open chunk
    (B, H) (zeros without learned momentum). pos: int32 scalar, tokens read so far.
    """

    W: Any
    G: Any
    opt: Any
    beta: jax.Array
    pos: jax.Array


def unit_norms(W):
    """‖w‖ over the input axis of every matrix leaf (..., d_in, d_out) -> (..., 1, d_out): the
    norm of each output unit's weight vector; None for vectors (they are not normalised)."""
    return jax.tree_util.tree_map(
        lambda w: jnp.sqrt(jnp.sum(w * w, axis=-2, keepdims=True)) if w.ndim >= 2 else None, W)


def weight_norm(W, norms):
    """Rescale every output unit's weight vector to the norm in `norms` (`unit_norms` of W_0):
    w ← w / (‖w‖ + 1e-5) · ‖w_0‖, as LaCT after each update."""
    def one(w, n):
        if n is None:
            return w
        cur = jnp.sqrt(jnp.sum(w * w, axis=-2, keepdims=True))
        return (w / (cur + WN_EPS) * n).astype(w.dtype)

    return jax.tree_util.tree_map(one, W, norms, is_leaf=lambda x: x is None)


def _lr_tree(lr, W):
    """lr: one (…, n) array for every leaf (returned as is), or a dict with W's keys."""
    if isinstance(lr, dict) and (not isinstance(W, dict) or set(lr) != set(W)):
        keys = sorted(W) if isinstance(W, dict) else type(W).__name__
        raise ValueError(f"lr: a dict of learning rates needs W's keys {keys}, got {sorted(lr)}")
    return lr


def _norms_bh(norms, B):
    """`unit_norms` targets with leading H -> leading (B, H) (matrix leaves (…, 1, d_out))."""
    if norms is None:
        return None
    return jax.tree_util.tree_map(
        lambda x: x if x.ndim == 4 else jnp.broadcast_to(x, (B, *x.shape)), norms)


def _check(learner, W0, q, k, v, lr, momentum, chunk, loss):
    checks.check_int("chunk", chunk, 1)
    checks.check_choice("loss", loss, LOSSES)
    checks.check_qkv(q, k, v)
    B, H, N, d_in = q.shape
    for name, x in jax.tree_util.tree_leaves_with_path(lr):
        checks.check_shape("lr" + jax.tree_util.keystr(name), x, (B, H, N), "(B, H, N)", like="q")
    if momentum is not None:
        checks.check_shape("momentum", momentum, (B, H, N), "(B, H, N)", like="q")
    checks.check_same_dtype(q=q, k=k, v=v)
    per_seq = checks.inner_state_layout(learner, W0, B, H, d_in)
    return per_seq


def _bh(W0, B, per_seq):
    return W0 if per_seq else jax.tree_util.tree_map(
        lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)


def _chunks(x, n):
    """(B, H, N', ...) with N' = M·n -> (M, B, H, n, ...): chunk axis first for the scan."""
    B, H = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, H, -1, n, *x.shape[3:]), 2, 0)


def _extra(beta_mean):
    return None if beta_mean is None else {"momentum": beta_mean}


def lact(learner, tx, W0, q, k, v, lr, *, chunk: int, fixed=None, loss: str = "dot",
         momentum=None, weight_norm_to=None, causal: bool = True, opt0=None, unroll: int = 8):
    """LaCT over a sequence (module docstring): (z (B, H, N, d_out), LaCTState after N tokens).

    learner: a `Learner` (closed-form `grads` for speed, e.g. `learners.swiglu`); tx: an inner
    optimizer (`inner_opt.make`, or any optax optimizer with learning rate 1); W0 leading H or
    (B, H); q, k (B, H, N, d_in); v (B, H, N, d_out); lr (B, H, N) or a dict with W0's keys of
    (B, H, N) (per weight matrix); momentum (B, H, N) or None: β of a chunk is its mean, passed
    to tx as the extra argument `momentum` (use `inner_opt.make(..., beta=None)`).
    weight_norm_to: None (no weight normalisation) or the target `unit_norms` (leading H or
    (B, H); usually unit_norms(W0)). opt0: the optimizer state to start from (default tx.init).
    unroll: chunks per iteration of the scan (`lax.scan`'s unroll, capped at the chunk count): a
    scan's backward costs XLA:CPU a fixed overhead per iteration that is large next to a few
    chunks' work (8k tokens in chunks of 2048: 2.2 s -> 1.8 s forward+backward with 4).
    """
    per_seq = _check(learner, W0, q, k, v, lr, momentum, chunk, loss)
    B, H, N, _ = q.shape
    n = chunk
    W = _bh(W0, B, per_seq)
    s = inner_opt.init_opt(tx, W) if opt0 is None else opt0
    lr = _lr_tree(lr, W)
    norms = _norms_bh(weight_norm_to, B)

    def chunk_update(W_h, s_h, fixed_h, norms_h, k_c, v_c, lr_c, beta_c):
        """One chunk's update of one head: k_c (n, d), lr_c leaves (n,), beta_c () or None."""
        g = weighted_grads(learner, W_h, fixed_h, k_c, v_c, lr_c, loss)
        u, s_new = inner_opt.apply_update(tx, g, s_h, W_h, _extra(beta_c))
        W_new = jax.tree_util.tree_map(lambda w, u_l: (w + u_l).astype(w.dtype), W_h, u)
        return (W_new if norms_h is None else weight_norm(W_new, norms_h)), s_new

    beta = momentum
    full = N // n if causal else -(-N // n)
    if not causal and full * n > N:  # the final partial chunk updates too: zero-λ padding
        pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, full * n - N)] + [(0, 0)] * (x.ndim - 3))
        k_u, v_u = pad(k), pad(v)
        lr_u = jax.tree_util.tree_map(pad, lr)
        # β of the partial chunk is the mean over its real tokens
        count = jnp.minimum(n, N - jnp.arange(full) * n).astype(q.dtype)  # (M,)
        beta_u = None if beta is None else pad(beta).reshape(B, H, full, n).sum(-1) / count
    else:
        cut = lambda x: x[:, :, : full * n]
        k_u, v_u = cut(k), cut(v)
        lr_u = jax.tree_util.tree_map(cut, lr)
        beta_u = None if beta is None else cut(beta).reshape(B, H, full, n).mean(-1)

    def head_scan(W_h, s_h, fixed_h, norms_h, q_m, k_m, v_m, lr_m, beta_m):
        """All complete chunks of one head: (W, s) after them and, causal, the answers per chunk.

        Causal, chunk m + 1 is answered right after chunk m's update, and the last chunk's update
        runs after the loop: only the state and an open chunk read it, so a caller that keeps
        neither (a training step) never computes it, in the forward or the backward (inside the
        loop XLA could not drop it; at N = chunk it was the whole update)."""
        update = lambda W_c, s_c, k_c, v_c, lr_c, beta_c: chunk_update(
            W_c, s_c, fixed_h, norms_h, k_c, v_c, lr_c, beta_c)
        cap = lambda m: max(1, min(unroll, m))
        if not causal:  # update, then apply (after the loop)
            return jax.lax.scan(lambda carry, xs: (update(*carry, *xs), None), (W_h, s_h),
                                (k_m, v_m, lr_m, beta_m), unroll=cap(full))

        def body(carry, xs):
            *kvlb, q_next = xs
            W_c, s_c = update(*carry, *kvlb)
            return (W_c, s_c), learner.apply(W_c, q_next, fixed_h)

        upto = lambda x: x[:-1]
        xs = (*jax.tree_util.tree_map(upto, (k_m, v_m, lr_m, beta_m)), q_m[1:])
        (W_c, s_c), z_rest = jax.lax.scan(body, (W_h, s_h), xs, unroll=cap(full - 1))
        last = jax.tree_util.tree_map(lambda x: x[-1], (k_m, v_m, lr_m, beta_m))
        z = jnp.concatenate([learner.apply(W_h, q_m[0], fixed_h)[None], z_rest], axis=0)
        return update(W_c, s_c, *last), z

    over_h = jax.vmap(head_scan, in_axes=(0, 0, 0, 0, 1, 1, 1, 1, 1))
    over_b = jax.vmap(over_h, in_axes=(0, 0, None, 0, 1, 1, 1, 1, 1))
    zs = []
    if full:
        chunks = lambda x: _chunks(x, n)  # (M, B, H, n, ...)
        beta_m = None if beta_u is None else jnp.moveaxis(beta_u, 2, 0)  # (M, B, H)
        q_m = chunks(q[:, :, : full * n]) if causal else jnp.zeros((full, B, H, 0, 0), q.dtype)
        (W, s), z_m = over_b(W, s, fixed, norms, q_m, chunks(k_u), chunks(v_u),
                             jax.tree_util.tree_map(chunks, lr_u), beta_m)
        if causal:  # z_m (B, H, M, n, d_out)
            zs.append(z_m.reshape(B, H, full * n, z_m.shape[-1]))
    apply_bh = jax.vmap(jax.vmap(learner.apply, in_axes=(0, 0, 0 if fixed is not None else None)),
                        in_axes=(0, 0, None))
    G = jax.tree_util.tree_map(jnp.zeros_like, W)
    beta_open = jnp.zeros((B, H), q.dtype)
    if not causal:
        return apply_bh(W, q, fixed), LaCTState(W, G, s, beta_open, jnp.asarray(N, jnp.int32))
    r = N - full * n
    if r:  # the open chunk: answered with the current W, its gradient kept in the state
        tail = lambda x: x[:, :, full * n:]
        zs.append(apply_bh(W, tail(q), fixed))
        grads_bh = jax.vmap(jax.vmap(
            lambda W_h, f_h, k_c, v_c, lr_c: weighted_grads(learner, W_h, f_h, k_c, v_c, lr_c,
                                                            loss),
            in_axes=(0, 0, 0, 0, 0)), in_axes=(0, None, 0, 0, 0))
        G = grads_bh(W, fixed, tail(k), tail(v), jax.tree_util.tree_map(tail, lr))
        if beta is not None:
            beta_open = tail(beta).sum(-1)
    z = jnp.concatenate(zs, axis=2) if len(zs) > 1 else zs[0]
    return z, LaCTState(W, G, s, beta_open, jnp.asarray(N, jnp.int32))


def init_state(tx, W0, batch: int, dtype=None) -> LaCTState:
    """The state before the first token: W0 (leading H) per sequence, G = 0, tx.init, pos 0."""
    W = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch, *jnp.shape(w))), W0)
    dtype = dtype or jax.tree_util.tree_leaves(W)[0].dtype
    H = jax.tree_util.tree_leaves(W)[0].shape[1]
    return LaCTState(W, jax.tree_util.tree_map(jnp.zeros_like, W), inner_opt.init_opt(tx, W),
                     jnp.zeros((batch, H), dtype), jnp.zeros((), jnp.int32))


def step(learner, tx, state: LaCTState, q_t, k_t, v_t, lr_t, *, chunk: int, fixed=None,
         loss: str = "dot", momentum_t=None, weight_norm_to=None):
    """One token of causal LaCT: (z_t (B, H, d_out), next state). q_t, k_t (B, H, d_in); v_t
    (B, H, d_out); lr_t (B, H) or a dict of them; momentum_t (B, H) or None; weight_norm_to as
    `lact`. z_t reads W (the open chunk's tokens never answer each other); the token's gradient
    joins G, and the chunk's last token applies the update."""
    B, H = q_t.shape[:2]
    checks.check_leading("state.G", state.G, (B, H), "(B, H)")
    W = state.W
    lr_t = _lr_tree(lr_t, W)
    apply_bh = jax.vmap(jax.vmap(learner.apply, in_axes=(0, 0, 0 if fixed is not None else None)),
                        in_axes=(0, 0, None))
    z_t = apply_bh(W, q_t, fixed)
    one = lambda x: x[:, :, None]  # (B, H, ...) -> (B, H, 1, ...): a block of one token
    grads_bh = jax.vmap(jax.vmap(
        lambda W_h, f_h, k_c, v_c, lr_c: weighted_grads(learner, W_h, f_h, k_c, v_c, lr_c, loss),
        in_axes=(0, 0, 0, 0, 0)), in_axes=(0, None, 0, 0, 0))
    g = grads_bh(W, fixed, one(k_t), one(v_t), jax.tree_util.tree_map(one, lr_t))
    G = jax.tree_util.tree_map(lambda G_l, g_l: (G_l + g_l).astype(G_l.dtype), state.G, g)
    beta = state.beta if momentum_t is None else state.beta + momentum_t
    norms = _norms_bh(weight_norm_to, B)

    def close(args):
        W_, G_, s_, beta_ = args

        def head(W_h, G_h, s_h, n_h, b_h):
            extra = None if momentum_t is None else {"momentum": b_h / chunk}
            u, s_new = inner_opt.apply_update(tx, G_h, s_h, W_h, extra)
            W_new = jax.tree_util.tree_map(lambda w, u_l: (w + u_l).astype(w.dtype), W_h, u)
            return (W_new if n_h is None else weight_norm(W_new, n_h)), s_new

        W_new, s_new = jax.vmap(jax.vmap(head))(W_, G_, s_, norms, beta_)
        return (W_new, jax.tree_util.tree_map(jnp.zeros_like, G_), s_new, jnp.zeros_like(beta_))

    ends = state.pos % chunk == chunk - 1
    W, G, s, beta = jax.lax.cond(ends, close, lambda args: args, (W, G, state.opt, beta))
    return z_t, LaCTState(W, G, s, beta, state.pos + 1)


def naive(learner, tx, W0, q, k, v, lr, *, chunk: int, fixed=None, loss: str = "dot",
          momentum=None, weight_norm_to=None, causal: bool = True):
    """Reference (tests only): (z, W after the last update, optimizer state). Python loops over
    chunks and tokens; every per-token gradient ∇l(W; k_j, v_j) is taken with jax.grad and
    materialised, then weighted and summed; every update is applied from the definition."""
    per_seq = _check(learner, W0, q, k, v, lr, momentum, chunk, loss)
    B, H, N, _ = q.shape
    W = _bh(W0, B, per_seq)
    s = inner_opt.init_opt(tx, W)
    lr = _lr_tree(lr, W)
    if not isinstance(lr, dict):
        lr = jax.tree_util.tree_map(lambda _: lr, W)
    fix = jax.tree_util.tree_map(lambda f: jnp.broadcast_to(f, (B, *f.shape)), fixed)
    per_bh = lambda fn: jax.jit(jax.vmap(jax.vmap(fn)))
    grad = per_bh(jax.grad(lambda W_, f, kj, vj: inner_loss(learner, W_, f, kj, vj, loss)))
    answer = per_bh(learner.apply)
    norms = _norms_bh(weight_norm_to, B)

    def update(W, s, g, beta_c):
        def head(W_h, s_h, g_h, b_h, n_h):
            extra = None if b_h is None else {"momentum": b_h}
            u, s_new = inner_opt.apply_update(tx, g_h, s_h, W_h, extra)
            W_new = jax.tree_util.tree_map(lambda w, u_l: w + u_l, W_h, u)
            return (W_new if n_h is None else weight_norm(W_new, n_h)), s_new

        return jax.vmap(jax.vmap(head))(W, s, g, beta_c, norms)

    zs = []
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        if causal:
            zs += [answer(W, q[:, :, t], fix) for t in range(start, stop)]
        if causal and stop - start < chunk:
            break  # the open chunk: answered, no update
        g = None
        for j in range(start, stop):
            g_j = grad(W, fix, k[:, :, j], v[:, :, j])
            scaled = jax.tree_util.tree_map(
                lambda x, lr_l: lr_l[:, :, j].reshape(B, H, *([1] * (x.ndim - 2))) * x, g_j, lr)
            g = scaled if g is None else jax.tree_util.tree_map(jnp.add, g, scaled)
        beta_c = None if momentum is None else momentum[:, :, start:stop].mean(-1)
        W, s = update(W, s, g, beta_c)
    if not causal:
        zs = [answer(W, q[:, :, t], fix) for t in range(N)]
    return jnp.stack(zs, axis=2), W, s


__all__ = ["LaCTState", "init_state", "lact", "naive", "step", "unit_norms", "weight_norm"]
