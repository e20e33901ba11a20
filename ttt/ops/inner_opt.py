"""Inner optimizers: the fast weights' update as an `optax.GradientTransformation`, and causal
mini-batch TTT (TTT-LM) driven by one (docs/design.md §14).

The convention: an inner optimizer `tx` maps the gradient ĝ of a step (a weighted sum of per-token
gradients, all taken at the step's starting weights W) to an update u with unit learning rate,
optax-style, `(u, s') = tx.update(ĝ, s, W)`; the op scales u by the step size the layer produces
and adds it: W' = W + c · u. Plain gradient descent is `optax.sgd(1.0)` (u = −ĝ); `make(name)`
builds the optimizers the layers name, and any optax optimizer built with learning rate 1 works
(e.g. `optax.adam(1.0)`, `optax.contrib.muon(1.0)`).

TTT-LM's learning rates factorise, η_ij = c_i · a_j (`ttt_state`): the token gate a_j weighs token
j's gradient in ĝ, the position coefficient c_i scales the optimizer's output. Inside a mini-batch
of b tokens with starting state (W, s), token i reads the weights the optimizer would produce if
the mini-batch ended at i:

    G_i = Σ_{j≤i} a_j ∇l(W; k_j, v_j),   (u_i, s_i) = tx.update(G_i, s, W),
    W_i = W + c_i u_i,   z_i = f(q_i; W_i),   and (W_b, s_b) is carried to the next mini-batch.

With tx = sgd(1), u_i = −G_i and W_i = W − Σ_j c_i a_j g_j: the dual form's mini-batch GD
(`tests/test_inner_opt.py` holds them equal). The optimizer state is part of the recurrent state:
the decode state is (W, G, s, pos) and one token is G ← G + a_t g_t, (u, s') = tx.update(G, s, W),
z_t = f(q_t; W + c_t u), and at the mini-batch's last token W ← W + c_t u, s ← s', G ← 0.

- `forward` is the generic path (primal-like, `lax.scan` over mini-batches, every W_i materialised,
  one optimizer update per token row): slower than the dual form, which stays the path that runs
  for plain GD. `prefill` / `step` are its decode path; `naive` the token loop of the tests.
- `StateMachine(tx)` offers `forward` / `prefill` / `step` / `init_state` with the signatures of
  `ttt.ops.ttt_state`, so a layer swaps one for the other.

Notable choices:
- `orthogonalize` (Newton–Schulz, LaCT's five quintic steps, the coefficients of optax's "dion"
  preset) is written here rather than taken from `optax.contrib.muon`: it orthogonalises every
  matrix leaf and leaves vectors alone (optax's muon sends non-matrices to Adam), and its Frobenius
  normalisation has a finite gradient at a zero update (padding, zero learning rates).
- `trace(beta=None)` is momentum whose β may come per step as the extra argument `momentum`
  (LaCT's learned per-chunk momentum); optax's `chain` passes extra arguments through.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ttt.ops import checks, ttt_state
from ttt.ops._scan import from_minibatches, num_minibatches, scan_minibatches, to_minibatches
from ttt.ops.learners import reconstruction_loss

OPTIMIZERS = ("sgd", "momentum", "muon", "adam")
# (a, b, c) of X ← a X + (b A + c A²) X, A = X Xᵀ, one row per step (LaCT's; optax's "dion")
NS_COEFFS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


# ----------------------------------------------------------------------------- transforms


def newton_schulz(x, coeffs=NS_COEFFS, eps: float = 1e-7):
    """Approximate orthogonalisation U Vᵀ of a matrix x = U S Vᵀ (..., m, n) by Newton–Schulz.

    x is scaled to Frobenius norm ≤ 1, then each (a, b, c) of `coeffs` applies
    X ← a X + (b A + c A²) X with A = X Xᵀ on the shorter side (the map is odd in x, so
    newton_schulz(−x) = −newton_schulz(x)). The norm is sqrt(max(Σx², tiny)): a zero matrix maps
    to zero with a finite gradient.
    """
    wide = x.shape[-2] <= x.shape[-1]
    X = x if wide else jnp.swapaxes(x, -1, -2)  # (..., m ≤ n)
    sq = jnp.sum(X * X, axis=(-2, -1), keepdims=True)
    X = X / (jnp.sqrt(jnp.maximum(sq, jnp.finfo(X.dtype).tiny)) + eps)
    for a, b, c in coeffs:
        A = X @ jnp.swapaxes(X, -1, -2)  # (..., m, m)
        X = a * X + (b * A + c * (A @ A)) @ X
    return X if wide else jnp.swapaxes(X, -1, -2)


def orthogonalize(coeffs=NS_COEFFS, eps: float = 1e-7) -> optax.GradientTransformation:
    """Stateless transform: every leaf with ≥ 2 axes through `newton_schulz` (its last two axes),
    vectors (biases) unchanged."""

    def update(updates, state, params=None):
        del params
        ortho = lambda u: newton_schulz(u, coeffs, eps).astype(u.dtype) if u.ndim >= 2 else u
        return jax.tree_util.tree_map(ortho, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TraceState(NamedTuple):
    """The momentum buffer of `trace`, shaped like the parameters."""

    m: Any


def trace(beta: float | None = None) -> optax.GradientTransformationExtraArgs:
    """Momentum m ← g + β m, update m. beta None: β is the extra argument `momentum` of each
    update call (a scalar, e.g. LaCT's learned per-chunk factor); a float ignores extra args."""

    def init(params):
        return TraceState(jax.tree_util.tree_map(jnp.zeros_like, params))

    def update(updates, state, params=None, *, momentum=None, **extra):
        del params, extra
        b = beta if beta is not None else momentum
        if b is None:
            raise ValueError("trace(beta=None) needs the extra argument momentum=<β> per update")
        m = jax.tree_util.tree_map(lambda g, m0: (g + b * m0).astype(m0.dtype), updates, state.m)
        return m, TraceState(m)

    return optax.GradientTransformationExtraArgs(init, update)


def make(name: str, *, beta: float | None = 0.9) -> optax.GradientTransformationExtraArgs:
    """The inner optimizer `name` with unit learning rate (the op applies the layer's η):

    "sgd"       u = −ĝ                                   (plain gradient descent)
    "momentum"  m ← ĝ + β m, u = −m                      (beta None: β per step, `trace`)
    "muon"      m ← ĝ + β m, u = −NS(m)                  (LaCT's; β = 0: orthogonalised GD)
    "adam"      optax.adam(1.0, b1=β): u = −m̂ / (√v̂ + ε)  (beta None: b1 = 0.9)
    """
    checks.check_choice("inner optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return optax.chain(optax.sgd(1.0))
    if name == "momentum":
        return optax.chain(trace(beta), optax.scale(-1.0))
    if name == "muon":
        return optax.chain(trace(beta), orthogonalize(), optax.scale(-1.0))
    return optax.chain(optax.adam(1.0, b1=0.9 if beta is None else beta))


def apply_update(tx, grads, state, params, extra=None):
    """(u, s') = tx.update(grads, state, params, **extra), u cast to the parameters' dtypes."""
    extra = extra or {}
    u, state = optax.with_extra_args_support(tx).update(grads, state, params, **extra)
    return jax.tree_util.tree_map(lambda x, p: x.astype(p.dtype), u, params), state


def init_opt(tx, W):
    """tx.init for a state W whose leaves lead with (B, H): one optimizer state per (B, H)."""
    return jax.vmap(jax.vmap(tx.init))(W)


# ----------------------------------------------------------------------------- TTT-LM, generic


class OptState(NamedTuple):
    """Decode state of causal TTT with an inner optimizer (leaves lead with (B, H)).

    W: weights at the start of the current mini-batch. G: Σ_j a_j ∇l(W; k_j, v_j) over the tokens of
    the mini-batch read so far. opt: the optimizer state at the start of the mini-batch.
    pos: int32 scalar, tokens read so far.
    """

    W: Any
    G: Any
    opt: Any
    pos: jax.Array


def _per_sequence(learner, W0, q):
    B, H, _, d_in = q.shape
    per_seq = checks.inner_state_layout(learner, W0, B, H, d_in)
    if per_seq:
        return W0
    return jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)


def _check(q, k, v, a, c, mini_batch):
    checks.check_int("mini_batch", mini_batch, 0)
    checks.check_rank("q", q, 4, "(B, H, N, d_in)")
    B, H, N, d_in = q.shape
    checks.check_shape("k", k, (B, H, N, d_in), "(B, H, N, d_in)", like="q")
    checks.check_shape("v", v, (B, H, N, None), "(B, H, N, d_out)", like="q")
    checks.check_shape("a", a, (B, H, N), "(B, H, N)", like="q")
    checks.check_shape("c", c, (N,), "(N,)", like="q")


def _run(learner, tx, W0, q, k, v, a, c, *, mini_batch, fixed=None, remat_every=0, unroll=1):
    """The generic forward: (z (B, H, N, d_out), W_N, s_N), states leading (B, H)."""
    _check(q, k, v, a, c, mini_batch)
    B, H, N, _ = q.shape
    b = mini_batch or N
    M = num_minibatches(N, b)
    W0 = _per_sequence(learner, W0, q)
    s0 = init_opt(tx, W0)
    a_m = to_minibatches(a[..., None], b)[..., 0]  # (B, H, M, b), zero gates past N
    c_m = jnp.pad(c, (0, M * b - N), mode="edge").reshape(M, b)  # padded rows repeat the last c
    live = jnp.ones((M,), q.dtype)  # 0 on the all-padding groups `scan_groups` may append
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    grads = jax.vmap(jax.grad(loss), in_axes=(None, None, 0, 0))  # per-token g_j, leaves (b, ...)
    answer = jax.vmap(learner.apply, in_axes=(0, 0, None))

    def head(W0_h, s0_h, fixed_h, xs_h):
        def step(carry, x):
            W, s = carry
            q_b, k_b, v_b, a_b, c_b, alive = x  # (b, d), (b, d), (b, e), (b,), (b,), ()
            g = grads(W, fixed_h, k_b, v_b)
            # G_i = Σ_{j≤i} a_j g_j: a cumulative sum over the rows
            G = jax.tree_util.tree_map(
                lambda g_l: jnp.cumsum(jnp.einsum("b,b...->b...", a_b, g_l), axis=0), g)
            u, s_rows = jax.vmap(lambda G_i: apply_update(tx, G_i, s, W))(G)  # leaves (b, ...)
            W_rows = jax.tree_util.tree_map(
                lambda w, u_l: (w + jnp.einsum("b,b...->b...", c_b, u_l)).astype(w.dtype), W, u)
            z = answer(W_rows, q_b, fixed_h)  # (b, d_out)
            last = lambda t: jax.tree_util.tree_map(lambda x_: x_[-1], t)
            keep = lambda new, old: jax.tree_util.tree_map(
                lambda n_, o_: jnp.where(alive > 0, n_, o_), new, old)
            return (keep(last(W_rows), W), keep(last(s_rows), s)), z

        return scan_minibatches(step, (W0_h, s0_h), xs_h, remat_every, unroll)

    over_h = jax.vmap(head, in_axes=(0, 0, 0, (0, 0, 0, 0, None, None)))
    over_b = jax.vmap(over_h, in_axes=(0, 0, None, (0, 0, 0, 0, None, None)))
    xs = (to_minibatches(q, b), to_minibatches(k, b), to_minibatches(v, b), a_m, c_m, live)
    (W_N, s_N), z = over_b(W0, s0, fixed, xs)  # z (B, H, M, b, d_out)
    return from_minibatches(z, N), W_N, s_N


def forward(learner, tx, W0, q, k, v, a, c, *, mini_batch, fixed=None, remat_every=0, unroll=1):
    """Causal mini-batch TTT with inner optimizer `tx` (module docstring): (z, W_N).

    q, k (B, H, N, d_in); v (B, H, N, d_out); a (B, H, N) token gates; c (N,) position
    coefficients; W0 leading H or (B, H); fixed leading H. mini_batch b (0: one mini-batch of N);
    remat_every, unroll as `ttt.ops.ttt.ttt_primal`. W_N leads with (B, H).
    """
    z, W_N, _ = _run(learner, tx, W0, q, k, v, a, c, mini_batch=mini_batch, fixed=fixed,
                     remat_every=remat_every, unroll=unroll)
    return z, W_N


def init_state(tx, W0, batch: int) -> OptState:
    """The state before the first token: W0 (leading H) per sequence, G = 0, tx.init, pos 0."""
    W = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (batch, *jnp.shape(w))), W0)
    return OptState(W, jax.tree_util.tree_map(jnp.zeros_like, W), init_opt(tx, W),
                    jnp.zeros((), jnp.int32))


def step(learner, tx, state: OptState, q_t, k_t, v_t, a_t, c_t, *, mini_batch: int, fixed=None):
    """One token: (z_t (B, H, d_out), next OptState). q_t, k_t (B, H, d_in); v_t (B, H, d_out);
    a_t (B, H); c_t a scalar or (B, H). mini_batch = 0 never closes the mini-batch."""
    B, H = q_t.shape[:2]
    checks.check_leading("state.G", state.G, (B, H), "(B, H)")
    c_bh = jnp.broadcast_to(jnp.asarray(c_t, a_t.dtype), (B, H))
    loss = lambda W, f, kj, vj: reconstruction_loss(learner, W, f, kj, vj)
    close = (state.pos % mini_batch == mini_batch - 1) if mini_batch > 0 else jnp.asarray(False)

    def head(W, G, s, f, q1, k1, v1, a, c):
        g = jax.grad(loss)(W, f, k1, v1)
        G = jax.tree_util.tree_map(lambda G_l, g_l: (G_l + a * g_l).astype(G_l.dtype), G, g)
        u, s_new = apply_update(tx, G, s, W)
        W_t = jax.tree_util.tree_map(lambda w, u_l: (w + c * u_l).astype(w.dtype), W, u)
        pick = lambda new, old: jax.tree_util.tree_map(lambda n_, o_: jnp.where(close, n_, o_),
                                                       new, old)
        zero = jax.tree_util.tree_map(jnp.zeros_like, G)
        return learner.apply(W_t, q1, f), (pick(W_t, W), pick(zero, G), pick(s_new, s))

    over_h = jax.vmap(head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0))
    over_b = jax.vmap(over_h, in_axes=(0, 0, 0, None, 0, 0, 0, 0, 0))
    z_t, (W, G, s) = over_b(state.W, state.G, state.opt, fixed, q_t, k_t, v_t, a_t, c_bh)
    return z_t, OptState(W, G, s, state.pos + 1)


def prefill(learner, tx, W0, q, k, v, a, c, *, mini_batch: int, fixed=None, remat_every=0,
            unroll=1):
    """Read a prompt: (z (B, H, N, d_out), OptState after N tokens). Whole mini-batches through
    the generic forward, the remaining N mod b tokens (all N when mini_batch = 0) through `step`."""
    B, _, N, _ = q.shape
    n_full = (N // mini_batch) * mini_batch if mini_batch > 0 else 0
    zs = []
    if n_full:
        head = lambda x: x[..., :n_full, :] if x.ndim == 4 else x[..., :n_full]
        z, W, s = _run(learner, tx, W0, head(q), head(k), head(v), head(a), c[:n_full],
                       mini_batch=mini_batch, fixed=fixed, remat_every=remat_every, unroll=unroll)
        zs.append(z)
        state = OptState(W, jax.tree_util.tree_map(jnp.zeros_like, W), s,
                         jnp.asarray(n_full, jnp.int32))
    else:
        W = _per_sequence(learner, W0, q)
        state = OptState(W, jax.tree_util.tree_map(jnp.zeros_like, W), init_opt(tx, W),
                         jnp.zeros((), jnp.int32))
    if N > n_full:
        rest = lambda x: jnp.moveaxis(x[:, :, n_full:], 2, 0)  # (r, B, H, ...)

        def one(state, xs):
            (q_t, k_t, v_t, a_t), c_t = xs
            z_t, state = step(learner, tx, state, q_t, k_t, v_t, a_t, c_t, mini_batch=mini_batch,
                              fixed=fixed)
            return state, z_t

        state, z_r = jax.lax.scan(one, state, ((rest(q), rest(k), rest(v), rest(a)), c[n_full:]))
        zs.append(jnp.moveaxis(z_r, 0, 2))  # (B, H, r, d_out)
    return (jnp.concatenate(zs, axis=2) if len(zs) > 1 else zs[0]), state


def naive(learner, tx, W0, q, k, v, a, c, *, mini_batch: int, fixed=None):
    """Token-by-token reference (tests only): (z, W_N, s_N). For every token i of a mini-batch it
    sums G_i = Σ_{j≤i} a_j g_j from scratch, calls tx.update on it and materialises W_i."""
    _check(q, k, v, a, c, mini_batch)
    B, H, N, _ = q.shape
    b = mini_batch or N
    W = _per_sequence(learner, W0, q)
    s = init_opt(tx, W)
    fix = jax.tree_util.tree_map(lambda f: jnp.broadcast_to(f, (B, *f.shape)), fixed)
    per_bh = lambda fn: jax.vmap(jax.vmap(fn))
    grad = jax.jit(per_bh(jax.grad(lambda W_, f, kj, vj: reconstruction_loss(learner, W_, f, kj,
                                                                                vj))))
    upd = jax.jit(per_bh(lambda G, s_, W_: apply_update(tx, G, s_, W_)))
    answer = jax.jit(per_bh(learner.apply))
    zs = []
    for start in range(0, N, b):
        stop = min(start + b, N)
        g = [grad(W, fix, k[:, :, j], v[:, :, j]) for j in range(start, stop)]
        for i in range(start, stop):
            G = jax.tree_util.tree_map(
                lambda *gs: sum(a[:, :, j].reshape(B, H, *([1] * (gs[0].ndim - 2))) * gs[j - start]
                                for j in range(start, i + 1)), *g)
            u, s_i = upd(G, s, W)
            W_i = jax.tree_util.tree_map(lambda w, u_l: w + c[i] * u_l, W, u)
            zs.append(answer(W_i, q[:, :, i], fix))
        W, s = W_i, s_i
    return jnp.stack(zs, axis=2), W, s


def _no_kernel(kernel: str) -> None:
    if kernel == "pallas":
        raise ValueError("kernel='pallas': the fused kernel runs plain mini-batch GD only; use "
                         "inner_opt=None, or kernel='auto' / 'xla' with an inner optimizer")


class StateMachine:
    """`ttt.ops.ttt_state`'s interface (forward / prefill / step / init_state) for inner optimizer
    `tx`, so a layer runs either with one switch. `form` and `kernel` are accepted for the same
    calls (one path: the generic scan); kernel="pallas" is refused (the kernel runs plain GD)."""

    State = OptState

    def __init__(self, tx):
        self.tx = tx

    def forward(self, learner, W0, q, k, v, a, c, *, mini_batch, fixed=None, form="auto",
                remat_every=0, unroll=1, kernel="auto"):
        del form
        _no_kernel(kernel)
        return forward(learner, self.tx, W0, q, k, v, a, c, mini_batch=mini_batch, fixed=fixed,
                       remat_every=remat_every, unroll=unroll)

    def prefill(self, learner, W0, q, k, v, a, c, *, mini_batch, fixed=None, form="auto",
                remat_every=0, unroll=1, kernel="auto"):
        del form
        _no_kernel(kernel)
        return prefill(learner, self.tx, W0, q, k, v, a, c, mini_batch=mini_batch, fixed=fixed,
                       remat_every=remat_every, unroll=unroll)

    def step(self, learner, state, q_t, k_t, v_t, a_t, c_t, *, mini_batch, fixed=None):
        return step(learner, self.tx, state, q_t, k_t, v_t, a_t, c_t, mini_batch=mini_batch,
                    fixed=fixed)

    def init_state(self, W0, batch: int) -> OptState:
        return init_state(self.tx, W0, batch)


def machine(name: str | None, beta: float | None = 0.9):
    """The state machine a TTT layer runs: the module `ttt.ops.ttt_state` for name None (plain GD:
    the dual and primal fast paths), else StateMachine(make(name, beta=beta))."""
    return ttt_state if name is None else StateMachine(make(name, beta=beta))


__all__ = ["NS_COEFFS", "OPTIMIZERS", "OptState", "StateMachine", "TraceState", "apply_update",
           "forward", "init_opt", "init_state", "machine", "make", "naive", "newton_schulz",
           "orthogonalize", "prefill", "step", "trace"]
