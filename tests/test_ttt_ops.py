"""Causal mini-batch TTT: primal == dual == naive (outputs, final state, gradients), the exact
special cases of docs/design.md §7 (E3 causal linear attention, the delta rule), causality, remat,
decoding, argument checks.

Every forward/backward pair is compiled once per (learner, shapes) and reused across tests: the
suite is dominated by compile time, not by running.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ttt.ops import learners as L
from ttt.ops.ttt import ttt, ttt_decode_step, ttt_dual, ttt_naive, ttt_primal

B, H, D = 2, 2, 4
LEARNERS = {
    "linear": L.linear(),
    "mlp": L.mlp(),
    "ln_linear": L.ln_residual(L.linear()),
    "ln_mlp": L.ln_residual(L.mlp()),
    "linear_nobias": L.linear(bias=False),
}
WORST = {}  # equivalence name -> worst relative error seen (printed with `pytest -s`)


def _record(name, err):
    WORST[name] = max(WORST.get(name, 0.0), err)
    print(f"\n  worst rel err {name}: {WORST[name]:.2e}")


def make_case(name, n, b, layout, dtype=jnp.float64, seed=0, per_sequence=False):
    """Random (learner, W0, q, k, v, eta, fixed); W0 far from zero so every path matters."""
    lrn = LEARNERS[name]
    rng = np.random.default_rng(seed)
    lead = (B, H) if per_sequence else (H,)
    per_head = lrn.init(jax.random.PRNGKey(seed), D)
    W0 = jax.tree_util.tree_map(
        lambda w: jnp.asarray(0.4 * rng.normal(size=(*lead, *w.shape)), dtype), per_head
    )
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, n, D)), dtype) for _ in range(3))
    eta_shape = (B, H, n) if layout == "token" else (B, H, n, b)
    eta = jnp.asarray(rng.uniform(0.05, 0.4, size=eta_shape), dtype)
    fixed = None
    if name.startswith("ln_"):
        fixed = {
            "scale": jnp.asarray(1.0 + 0.2 * rng.normal(size=(H, D)), dtype),
            "bias": jnp.asarray(0.2 * rng.normal(size=(H, D)), dtype),
        }
    return lrn, W0, q, k, v, eta, fixed


def _probe(z, W_N, Rz, RW):
    """A random linear functional of the outputs and the final state."""
    return jnp.sum(z * Rz) + sum(jnp.sum(w * r) for w, r in zip(W_N, RW, strict=True))


@functools.cache
def forward_and_grads(name, b, remat_every=0, forms=("primal", "dual"), unroll=1):
    """jit: per form, (z, W_N, grads of a random functional w.r.t. q, k, v, eta, W0)."""
    lrn = LEARNERS[name]
    fns = {"primal": ttt_primal, "dual": ttt_dual}

    def run(q, k, v, eta, W0, fixed, Rz, RW):
        out = {}
        for form in forms:
            def loss(q, k, v, eta, W0, form=form):
                z, W_N = fns[form](
                    lrn, W0, q, k, v, eta, mini_batch=b, fixed=fixed, remat_every=remat_every,
                    unroll=unroll,
                )
                return _probe(z, jax.tree_util.tree_leaves(W_N), Rz, RW), (z, W_N)

            grads, (z, W_N) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
                q, k, v, eta, W0
            )
            out[form] = (z, W_N, grads)
        return out

    return jax.jit(run)


def _probe_weights(q, W0, per_sequence=False, seed=1):
    """Random weights of the functional: Rz like z, RW like the leaves of W_N (leading (B, H))."""
    rng = np.random.default_rng(seed)
    Rz = jnp.asarray(rng.normal(size=q.shape), q.dtype)  # d_out == d_in for every learner here
    lead = lambda w: w.shape if per_sequence else (B, *w.shape)  # (H, ...) -> (B, H, ...)
    RW = [jnp.asarray(rng.normal(size=lead(w)), q.dtype) for w in jax.tree_util.tree_leaves(W0)]
    return Rz, RW


_slow = pytest.mark.slow
EQUIV = [
    # learner, N, b, eta layout, also differentiate the naive loop
    ("linear", 10, 4, "token", True),
    ("ln_mlp", 37, 16, "row", False),
    ("ln_linear", 7, 1, "token", False),
    pytest.param("ln_mlp", 10, 4, "row", True, marks=_slow),
    pytest.param("mlp", 37, 16, "row", False, marks=_slow),
    pytest.param("mlp", 7, 1, "token", False, marks=_slow),
    pytest.param("ln_linear", 37, 16, "row", False, marks=_slow),
    pytest.param("linear", 37, 16, "row", True, marks=_slow),
    pytest.param("ln_mlp", 7, 1, "row", False, marks=_slow),
]


@pytest.mark.parametrize("name,n,b,layout,naive_grads", EQUIV)
def test_primal_dual_naive_agree_float64(x64, name, n, b, layout, naive_grads):
    lrn, W0, q, k, v, eta, fixed = make_case(name, n, b, layout)
    Rz, RW = _probe_weights(q, W0)
    out = forward_and_grads(name, b)(q, k, v, eta, W0, fixed, Rz, RW)
    z_n, W_n = ttt_naive(lrn, W0, q, k, v, eta, mini_batch=b, fixed=fixed)
    for form in ("primal", "dual"):
        z, W_N, _ = out[form]
        _record(f"{form} vs naive: z (f64)", assert_close(z, z_n, 1e-10, f"{form} z"))
        _record(f"{form} vs naive: W_N (f64)", assert_close(W_N, W_n, 1e-10, f"{form} W_N"))
    _record(
        "dual vs primal: grads (f64)",
        assert_close(out["dual"][2], out["primal"][2], 1e-10, "dual vs primal grads"),
    )
    if naive_grads:
        def loss(q, k, v, eta, W0):
            z, W_N = ttt_naive(lrn, W0, q, k, v, eta, mini_batch=b, fixed=fixed)
            return _probe(z, jax.tree_util.tree_leaves(W_N), Rz, RW)

        g_n = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, eta, W0)
        _record(
            "primal vs naive: grads (f64)",
            assert_close(out["primal"][2], g_n, 1e-10, "primal vs naive grads"),
        )
    # negative control: the comparison sees a change of one learning rate
    z_bad, _ = ttt_naive(lrn, W0, q, k, v, eta.at[0, 0, 1].add(0.5), mini_batch=b, fixed=fixed)
    assert not np.allclose(z_bad, z_n, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "name,n,b", [("ln_linear", 10, 4), pytest.param("ln_mlp", 37, 16, marks=_slow)]
)
def test_primal_dual_naive_agree_float32(name, n, b):
    lrn, W0, q, k, v, eta, fixed = make_case(name, n, b, "token", dtype=jnp.float32, seed=3)
    Rz, RW = _probe_weights(q, W0)
    out = forward_and_grads(name, b)(q, k, v, eta, W0, fixed, Rz, RW)
    z_n, W_n = ttt_naive(lrn, W0, q, k, v, eta, mini_batch=b, fixed=fixed)
    assert out["dual"][0].dtype == jnp.float32
    for form in ("primal", "dual"):
        z, W_N, _ = out[form]
        _record(f"{form} vs naive: z (f32)", assert_close(z, z_n, 1e-5, f"{form} z"))
        _record(f"{form} vs naive: W_N (f32)", assert_close(W_N, W_n, 1e-5, f"{form} W_N"))
    _record(
        "dual vs primal: grads (f32)",
        # the backward through an LN over 4 features amplifies float32 roundoff (measured 1.05e-5
        # on the q-gradient), so gradients get 2e-5; outputs and states hold 1e-5
        assert_close(out["dual"][2], out["primal"][2], 2e-5, "dual vs primal grads"),
    )


# ----------------------------------------------------------------------------- any learner


def _three_layer_mlp():
    """A learner the loops have never heard of: 3 layers, tanh, a nested pytree, no `dense`."""

    def init(key, d_in):
        k1, k2, k3 = jax.random.split(key, 3)
        return {
            "in": {"W": 0.3 * jax.random.normal(k1, (d_in, 6)), "b": jnp.zeros(6)},
            "mid": 0.3 * jax.random.normal(k2, (6, 5)),
            "out": 0.3 * jax.random.normal(k3, (5, d_in)),
        }

    def apply(W, x, fixed):
        h = jnp.tanh(x @ W["in"]["W"] + W["in"]["b"])  # (..., 6)
        return jnp.tanh(h @ W["mid"]) @ W["out"]  # (..., d_in)

    return L.Learner("mlp3", init, apply)


def test_unknown_learner_primal_equals_naive_and_dual_refuses(x64):
    lrn = _three_layer_mlp()
    rng = np.random.default_rng(5)
    W0 = jax.vmap(lambda key: lrn.init(key, D))(jax.random.split(jax.random.PRNGKey(0), H))
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, 8, D))) for _ in range(3))
    eta = jnp.asarray(rng.uniform(0.1, 0.5, size=(B, H, 8)))
    z_p, W_p = ttt(lrn, W0, q, k, v, eta, mini_batch=4)  # form="auto" falls back to primal
    z_n, W_n = ttt_naive(lrn, W0, q, k, v, eta, mini_batch=4)
    _record("primal vs naive: 3-layer MLP z", assert_close(z_p, z_n, 1e-10, "mlp3 z"))
    _record("primal vs naive: 3-layer MLP W_N", assert_close(W_p, W_n, 1e-10, "mlp3 W_N"))
    with pytest.raises(ValueError, match="no dense-chain description"):
        ttt_dual(lrn, W0, q, k, v, eta, mini_batch=4)
    with pytest.raises(ValueError, match="no dense-chain description"):
        ttt(lrn, W0, q, k, v, eta, mini_batch=4, form="dual")


# ----------------------------------------------------------------------------- exact special cases


@functools.cache
def _forward(form, name, b):
    fn = {"primal": ttt_primal, "dual": ttt_dual}[form]
    return jax.jit(functools.partial(fn, LEARNERS[name], mini_batch=b))


def test_e3_batch_gd_is_causal_linear_attention(x64):
    """TTT-LM Theorem 1 in our ½ convention: b = N, W0 = 0, η = 1 ⇒ z_t = Σ_{s≤t} (q_t·k_s) v_s."""
    n = 12
    rng = np.random.default_rng(7)
    q, k, v = (rng.normal(size=(B, H, n, D)) for _ in range(3))
    # independent reference: the causal masked quadratic form of linear attention
    scores = np.einsum("bhtd,bhsd->bhts", q, k) * np.tril(np.ones((n, n)))  # (B, H, N, N)
    want = np.einsum("bhts,bhsd->bhtd", scores, v)  # (B, H, N, d)
    W0 = {"W1": jnp.zeros((H, D, D))}
    eta = jnp.ones((B, H, n))
    q, k, v = map(jnp.asarray, (q, k, v))
    for form in ("primal", "dual"):
        z, _ = _forward(form, "linear_nobias", n)(W0, q, k, v, eta)
        _record("E3: batch GD vs causal linear attention", assert_close(z, want, 1e-10, form))
    # negative controls: a nonzero start or smaller mini-batches break the identity
    z_w0, _ = _forward("dual", "linear_nobias", n)({"W1": W0["W1"] + 0.1}, q, k, v, eta)
    z_b4, _ = _forward("dual", "linear_nobias", 4)(W0, q, k, v, eta)
    assert not np.allclose(z_w0, want, rtol=1e-3)
    assert not np.allclose(z_b4, want, rtol=1e-3)


def test_online_gd_is_delta_rule(x64):
    """b = 1: S_t = S_{t−1} − η_t k_tᵀ (k_t S_{t−1} − v_t), z_t = q_t S_t (x W convention)."""
    n = 9
    rng = np.random.default_rng(8)
    q, k, v = (rng.normal(size=(B, H, n, D)) for _ in range(3))
    eta = rng.uniform(0.05, 0.3, size=(B, H, n))
    S0 = 0.3 * rng.normal(size=(H, D, D))
    want = np.zeros((B, H, n, D))
    S_fin = np.zeros((B, H, D, D))
    for bb in range(B):
        for h in range(H):
            S = S0[h].copy()
            for t in range(n):
                S = S - eta[bb, h, t] * np.outer(k[bb, h, t], k[bb, h, t] @ S - v[bb, h, t])
                want[bb, h, t] = q[bb, h, t] @ S
            S_fin[bb, h] = S
    args = ({"W1": jnp.asarray(S0)}, *map(jnp.asarray, (q, k, v, eta)))
    for form in ("primal", "dual"):
        z, W_N = _forward(form, "linear_nobias", 1)(*args)
        _record("b=1 vs delta rule: z", assert_close(z, want, 1e-10, f"{form} z"))
        _record("b=1 vs delta rule: W_N", assert_close(W_N["W1"], S_fin, 1e-10, f"{form} S"))
    z_b2, _ = _forward("dual", "linear_nobias", 2)(*args)  # negative control
    assert not np.allclose(z_b2, want, rtol=1e-3)


# ----------------------------------------------------------------------------- structure


def test_causality(x64):
    """Perturbing token t (q, k, v or η) leaves every earlier output unchanged, and changes z_t."""
    name, n, b, t = "ln_mlp", 37, 16, 20  # t sits inside the second mini-batch
    lrn, W0, q, k, v, eta, fixed = make_case(name, n, b, "row")
    Rz, RW = _probe_weights(q, W0)
    fwd = forward_and_grads(name, b)  # compiled once for the equivalence test of the same shapes
    out = fwd(q, k, v, eta, W0, fixed, Rz, RW)
    inputs = {"q": q, "k": k, "v": v, "eta": eta}
    for which, x in inputs.items():
        bumped = dict(inputs, **{which: x.at[:, :, t].add(0.7)})
        out2 = fwd(bumped["q"], bumped["k"], bumped["v"], bumped["eta"], W0, fixed, Rz, RW)
        for form in ("primal", "dual"):
            z, z2 = out[form][0], out2[form][0]
            np.testing.assert_array_equal(z2[:, :, :t], z[:, :, :t], f"{form}: {which}_{t}")
            assert not np.allclose(z2[:, :, t], z[:, :, t]), f"{form}: {which}_{t} had no effect"


def test_remat_gives_identical_results(x64):
    name, n, b = "linear", 10, 4
    lrn, W0, q, k, v, eta, fixed = make_case(name, n, b, "token")
    Rz, RW = _probe_weights(q, W0)
    plain = forward_and_grads(name, b)(q, k, v, eta, W0, fixed, Rz, RW)
    # 3 mini-batches in groups of 2: the group count is padded, which must change nothing
    remat = forward_and_grads(name, b, remat_every=2)(q, k, v, eta, W0, fixed, Rz, RW)
    for form in ("primal", "dual"):
        _record("remat vs plain", assert_close(remat[form], plain[form], 1e-12, f"{form} remat"))


def test_unrolled_scan_gives_identical_results(x64):
    """unroll (mini-batch steps per loop iteration) changes nothing, with and without remat groups;
    3 mini-batches, so unroll=2 leaves a remainder step."""
    name, n, b = "ln_mlp", 10, 4
    lrn, W0, q, k, v, eta, fixed = make_case(name, n, b, "token")
    Rz, RW = _probe_weights(q, W0)
    plain = forward_and_grads(name, b)(q, k, v, eta, W0, fixed, Rz, RW)
    for remat_every, unroll in ((0, 2), (2, 3)):
        out = forward_and_grads(name, b, remat_every=remat_every, unroll=unroll)(
            q, k, v, eta, W0, fixed, Rz, RW)
        for form in ("primal", "dual"):
            assert_close(out[form], plain[form], 1e-12, f"{form} unroll={unroll} r={remat_every}")


def test_decode_steps_reproduce_dual_with_per_sequence_state(x64):
    """Prefill by decode steps (η_ij = c_i a_j, mini-batches closed by the caller) == ttt_dual,
    starting from a per-sequence W0 with leading (B, H)."""
    name, n, b = "ln_mlp", 10, 4
    lrn, W0, q, k, v, _, fixed = make_case(name, n, b, "row", per_sequence=True)
    rng = np.random.default_rng(11)
    a = jnp.asarray(rng.uniform(0.05, 0.4, size=(B, H, n)))  # per-token lr
    c = jnp.asarray(1.0 / np.arange(1, b + 1))  # per-position coefficient, as TTT-LM's 1/(i+1)
    pad = -n % b
    a_mb = jnp.pad(a, [(0, 0), (0, 0), (0, pad)]).reshape(B, H, -1, 1, b)  # (B, H, M, 1, b)
    c_mb = c[None, None, None, :, None]  # (1, 1, 1, b, 1)
    eta = (c_mb * a_mb).reshape(B, H, -1, b)[:, :, :n]  # (B, H, N, b): eta[t, j] = c_i a_{mb+j}
    z_d, W_d = _forward("dual", name, b)(W0, q, k, v, eta, fixed=fixed)

    step = jax.jit(functools.partial(ttt_decode_step, lrn, fixed=fixed))
    W_start, G = W0, jax.tree_util.tree_map(jnp.zeros_like, W0)
    zs = []
    for t in range(n):
        c_t = jnp.full((B, H), c[t % b])
        z_t, G = step(W_start, G, q[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], c_t)
        zs.append(z_t)
        if t % b == b - 1 or t == n - 1:  # close the mini-batch
            W_start = jax.tree_util.tree_map(
                lambda w, g, c_t=c_t: w - c_t.reshape(B, H, *[1] * (g.ndim - 2)) * g, W_start, G
            )
            G = jax.tree_util.tree_map(jnp.zeros_like, G)
    z_dec = jnp.stack(zs, axis=2)  # (B, H, N, d)
    _record("decode steps vs dual: z", assert_close(z_dec, z_d, 1e-10, "decode z"))
    _record("decode steps vs dual: W_N", assert_close(W_start, W_d, 1e-10, "decode W_N"))
    # negative control: the batch elements carry different states
    assert not np.allclose(z_d[0], z_d[1])


def test_dispatch_and_per_sequence_broadcast(x64):
    """form="auto" picks dual for dense learners; W0 (H,) equals W0 broadcast to (B, H)."""
    lrn, W0, q, k, v, eta, _ = make_case("linear", 5, 4, "token")
    z_auto, W_auto = ttt(lrn, W0, q, k, v, eta, mini_batch=4)
    W0_bh = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    z_bh, W_bh = ttt(lrn, W0_bh, q, k, v, eta, mini_batch=4, form="primal")
    assert_close(z_auto, z_bh, 1e-12, "auto(H) vs primal(B, H) z")
    assert_close(W_auto, W_bh, 1e-12, "auto(H) vs primal(B, H) W_N")
    with pytest.raises(ValueError, match="form: unknown 'fast'; known: auto, dual, primal"):
        ttt(lrn, W0, q, k, v, eta, mini_batch=4, form="fast")


# ----------------------------------------------------------------------------- argument checks


def _bad_calls():
    lrn, W0, q, k, v, eta, _ = make_case("linear", 10, 4, "token", dtype=jnp.float32)
    ln = LEARNERS["ln_linear"]
    fixed_ok = {"scale": jnp.ones((H, D)), "bias": jnp.zeros((H, D))}
    fixed_bad = {"scale": jnp.ones((H + 1, D)), "bias": jnp.zeros((H + 1, D))}
    ok = dict(W0=W0, q=q, k=k, v=v, eta=eta)
    yield "q: expected a rank-4 array", lrn, dict(ok, q=q[0]), {}
    yield r"k: expected shape \(B, H, N, d_in\) = \(2, 2, 10, 4\)", lrn, dict(ok, k=k[:, :, 1:]), {}
    yield r"v: expected shape \(B, H, N, d_out\)", lrn, dict(ok, v=v[:1]), {}
    yield "v: learner linear maps d_in=4", lrn, dict(ok, v=v[..., :3]), {}
    yield r"eta: expected shape \(B, H, N, b\)", lrn, dict(ok, eta=jnp.ones((B, H, 10, 3))), {}
    yield r"eta: expected \(B, H, N\) per-token", lrn, dict(ok, eta=eta[0]), {}
    yield "q: expected a floating-point array", lrn, dict(ok, q=q.astype(jnp.int32)), {}
    yield "must share one dtype", lrn, dict(ok, v=v.astype(jnp.float16)), {}
    yield "mini_batch: expected an integer >= 1", lrn, ok, {"mini_batch": 0}
    yield "remat_every: expected an integer >= 0", lrn, ok, {"remat_every": -1}
    yield "unroll: expected an integer >= 1", lrn, ok, {"unroll": 0}
    yield "at least one token", lrn, dict(ok, q=q[:, :, :0], k=k[:, :, :0], v=v[:, :, :0],
                                          eta=eta[:, :, :0]), {}
    yield r"W0\['W1'\]: expected shape \(H, ...\)", lrn, dict(ok, W0=dict(W0, W1=W0["W1"][0])), {}
    yield "W0: expected a pytree like linear.init", lrn, dict(ok, W0={"W1": W0["W1"]}), {}
    yield "leaves mix leading", lrn, dict(
        ok, W0=dict(W0, b1=jnp.broadcast_to(W0["b1"], (B, H, D)))), {}
    yield r"fixed\['bias'\]: expected leading axes \(H,\)", ln, ok, {"fixed": fixed_bad}
    yield r"ln_residual\(linear\): apply\(W, x, fixed\) fails", ln, ok, {}
    yield None, ln, ok, {"fixed": fixed_ok}  # sanity: the same call with good args passes


@pytest.mark.parametrize("fn", [ttt_primal, ttt_dual, ttt_naive, ttt])
def test_bad_arguments_raise_in_words(fn):
    for message, lrn, args, kwargs in _bad_calls():
        call = lambda: jax.eval_shape(  # checks run at trace time: no compile needed
            lambda a: fn(lrn, a["W0"], a["q"], a["k"], a["v"], a["eta"], **kwargs), args
        )
        if fn is ttt_naive and ("remat_every" in kwargs or "unroll" in kwargs):
            continue  # the naive loop has no scan knobs
        if message is None:
            call()
            continue
        with pytest.raises(ValueError, match=message):
            call()


def test_decode_step_checks():
    lrn = LEARNERS["linear"]
    W = {"W1": jnp.zeros((B, H, D, D)), "b1": jnp.zeros((B, H, D))}
    x, s = jnp.zeros((B, H, D)), jnp.ones((B, H))
    z, G = jax.eval_shape(lambda: ttt_decode_step(lrn, W, W, x, x, x, s, s))
    assert z.shape == (B, H, D) and G["W1"].shape == (B, H, D, D)
    W_h = {"W1": jnp.zeros((H, D, D)), "b1": jnp.zeros((H, D))}
    with pytest.raises(ValueError, match=r"W_start: expected leading \(B, H\)"):
        ttt_decode_step(lrn, W_h, W_h, x, x, x, s, s)
    with pytest.raises(ValueError, match="G_acc: expected the same pytree"):
        ttt_decode_step(lrn, W, {"W1": W["W1"]}, x, x, x, s, s)
    with pytest.raises(ValueError, match=r"c_t: expected shape \(B, H\)"):
        ttt_decode_step(lrn, W, W, x, x, x, s, s[0])
    with pytest.raises(ValueError, match=r"k_t: expected shape \(B, H, d_in\)"):
        ttt_decode_step(lrn, W, W, x, x[:, :, :3], x, s, s)
