"""Inner optimizers (docs/design.md §14): the transforms, the generic TTT-LM path (== the dual form
for plain SGD: outputs, final state, gradients; == a token loop for the others, == hand-written
momentum), its decode path carrying the optimizer state, the TTT layer and MTTT with an inner
optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close, rel_err

from ttt.layers import make_mixer
from ttt.ops import inner_opt, ttt_state
from ttt.ops import learners as L
from ttt.ops.mttt import mttt

B, H, D = 2, 2, 4


def _case(learner, n, b, seed=0, dtype=jnp.float64):
    """(W0, fixed, q, k, v, a, c) of TTT-LM with η_ij = c_i a_j, W0 far from zero."""
    rng = np.random.default_rng(seed)
    per_head = learner.init(jax.random.PRNGKey(seed), D)
    W0 = jax.tree_util.tree_map(lambda w: jnp.asarray(0.4 * rng.normal(size=(H, *w.shape)),
                                                      dtype), per_head)
    fixed = {"scale": jnp.asarray(1.0 + 0.2 * rng.normal(size=(H, D)), dtype),
             "bias": jnp.asarray(0.2 * rng.normal(size=(H, D)), dtype)}
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, n, D)), dtype) for _ in range(3))
    a = jnp.asarray(rng.uniform(0.2, 1.0, size=(B, H, n)), dtype)
    offset = jnp.asarray(0.1 * rng.normal(size=(b,)), dtype)
    c = ttt_state.lr_coefficients(jnp.arange(n) % b, offset, 0.3)
    return W0, fixed, q, k, v, a, c


def _probe(tree, seed=1):
    """A random linear functional of a pytree (for gradients of several outputs at once)."""
    rng = np.random.default_rng(seed)
    leaves = jax.tree_util.tree_leaves(tree)
    return sum(jnp.sum(x * jnp.asarray(rng.normal(size=x.shape), x.dtype)) for x in leaves)


# ----------------------------------------------------------------------------- transforms


def test_newton_schulz_orthogonalises_is_odd_and_safe_at_zero(x64):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 9)))
    y = inner_opt.newton_schulz(x)
    sv = np.linalg.svd(np.asarray(y), compute_uv=False)
    assert 0.6 < sv.min() and sv.max() < 1.25, sv  # U Vᵀ up to LaCT's coefficient band
    u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
    assert rel_err(y / np.linalg.norm(y), u @ vt / np.linalg.norm(u @ vt)) < 0.2
    assert_close(inner_opt.newton_schulz(-x), -y, 1e-14, "odd")
    assert_close(inner_opt.newton_schulz(x.T), y.T, 1e-12, "transposed")
    g = jax.grad(lambda z: jnp.sum(inner_opt.newton_schulz(z)))(jnp.zeros((3, 5)))
    assert np.all(np.isfinite(np.asarray(g)))  # zero updates (padding) stay differentiable
    assert float(jnp.max(jnp.abs(inner_opt.newton_schulz(jnp.zeros((3, 5)))))) == 0.0


def test_make_follows_the_written_formulas(x64):
    rng = np.random.default_rng(0)
    W = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(4,)))}
    g1, g2 = ({n: jnp.asarray(rng.normal(size=x.shape)) for n, x in W.items()} for _ in range(2))

    def two_steps(tx, **extra):
        s = tx.init(W)
        _, s = inner_opt.apply_update(tx, g1, s, W, extra)
        return inner_opt.apply_update(tx, g2, s, W, extra)[0]

    neg = lambda t: jax.tree_util.tree_map(lambda x: -x, t)
    m = jax.tree_util.tree_map(lambda a, b: b + 0.7 * a, g1, g2)
    assert_close(two_steps(inner_opt.make("sgd")), neg(g2), 1e-15, "sgd")
    assert_close(two_steps(inner_opt.make("momentum", beta=0.7)), neg(m), 1e-15, "momentum")
    assert_close(two_steps(inner_opt.make("momentum", beta=None), momentum=0.7), neg(m), 1e-15,
                 "momentum with β as an extra argument")
    muon = {"w": -inner_opt.newton_schulz(m["w"]), "b": -m["b"]}  # vectors pass through
    assert_close(two_steps(inner_opt.make("muon", beta=0.7)), muon, 1e-14, "muon")
    want = optax.adam(1.0, b1=0.7)
    s = want.init(W)
    _, s = want.update(g1, s, W)
    assert_close(two_steps(inner_opt.make("adam", beta=0.7)), want.update(g2, s, W)[0], 1e-15)
    with pytest.raises(ValueError, match="momentum=<β>"):
        two_steps(inner_opt.make("muon", beta=None))
    with pytest.raises(ValueError, match="unknown 'lion'"):
        inner_opt.make("lion")


# ----------------------------------------------------------------------------- TTT-LM generic path


@pytest.mark.parametrize("name,learner", [("ln_linear", L.ln_residual(L.linear())),
                                          ("mlp", L.mlp(factor=2))])
def test_generic_sgd_equals_the_dual_form(x64, name, learner):
    """Outputs, final state and every gradient, with a final partial mini-batch (N = 11, b = 4)."""
    n, b = 11, 4
    W0, fixed, q, k, v, a, c = _case(learner, n, b)
    fixed = fixed if name.startswith("ln_") else None

    def run(path, W0, q, k, v, a, c):
        if path == "dual":
            return ttt_state.forward(learner, W0, q, k, v, a, c, mini_batch=b, fixed=fixed,
                                     form="dual")
        return inner_opt.forward(learner, inner_opt.make("sgd"), W0, q, k, v, a, c,
                                 mini_batch=b, fixed=fixed)

    args = (W0, q, k, v, a, c)
    assert_close(run("generic", *args), run("dual", *args), 1e-10, f"{name} outputs and W_N")
    grads = {p: jax.grad(lambda *xs, p=p: _probe(run(p, *xs)), argnums=range(6))(*args)
             for p in ("dual", "generic")}
    assert_close(grads["generic"], grads["dual"], 1e-10, f"{name} gradients")
    # negative control: momentum is a different update
    z_m, _ = inner_opt.forward(learner, inner_opt.make("momentum"), *args, mini_batch=b,
                               fixed=fixed)
    assert rel_err(z_m, run("dual", *args)[0]) > 1e-3


@pytest.mark.parametrize("opt", ["momentum", "muon", "adam"])
def test_generic_path_equals_the_token_loop(x64, opt):
    learner = L.ln_residual(L.linear())
    n, b = 10, 4
    W0, fixed, q, k, v, a, c = _case(learner, n, b, seed=2)
    tx = inner_opt.make(opt)
    z, W_N, s_N = inner_opt._run(learner, tx, W0, q, k, v, a, c, mini_batch=b, fixed=fixed)
    z_ref, W_ref, s_ref = inner_opt.naive(learner, tx, W0, q, k, v, a, c, mini_batch=b,
                                          fixed=fixed)
    assert_close((z, W_N, s_N), (z_ref, W_ref, s_ref), 1e-10, f"{opt} vs the token loop")
    if opt == "momentum":  # and the gradients of one optimizer through both loops
        run = lambda f, q, k, a: _probe(f(learner, tx, W0, q, k, v, a, c, mini_batch=b,
                                          fixed=fixed)[:2])
        g = jax.grad(lambda *xs: run(inner_opt._run, *xs), argnums=(0, 1, 2))(q, k, a)
        g_ref = jax.grad(lambda *xs: run(inner_opt.naive, *xs), argnums=(0, 1, 2))(q, k, a)
        assert_close(g, g_ref, 1e-10, "momentum gradients vs the token loop")


def test_momentum_mapping_written_by_hand(x64):
    """η_ij = c_i a_j with momentum β: W_i = W − c_i (β m + Σ_{j≤i} a_j g_j), m ← β m + G_b,
    computed here from per-token jax.grad with no optax at all."""
    learner, beta = L.linear(), 0.6
    n, b = 8, 4
    W0, _, q, k, v, a, c = _case(learner, n, b, seed=3)
    loss = lambda W, kj, vj: L.reconstruction_loss(learner, W, None, kj, vj)
    zs = np.zeros((B, H, n, D))
    for bi in range(B):
        for h in range(H):
            W = jax.tree_util.tree_map(lambda w, h=h: w[h], W0)
            m = jax.tree_util.tree_map(jnp.zeros_like, W)
            for start in range(0, n, b):
                g = [jax.grad(loss)(W, k[bi, h, j], v[bi, h, j]) for j in range(start, start + b)]
                G = jax.tree_util.tree_map(jnp.zeros_like, W)
                for i in range(b):
                    G = jax.tree_util.tree_map(lambda G_, g_, i=i: G_ + a[bi, h, start + i] * g_,
                                               G, g[i])
                    W_i = jax.tree_util.tree_map(
                        lambda w, m_, G_, i=i: w - c[start + i] * (beta * m_ + G_), W, m, G)
                    zs[bi, h, start + i] = np.asarray(learner.apply(W_i, q[bi, h, start + i]))
                m = jax.tree_util.tree_map(lambda m_, G_: beta * m_ + G_, m, G)
                W = W_i
    z, _ = inner_opt.forward(learner, inner_opt.make("momentum", beta=beta), W0, q, k, v, a, c,
                             mini_batch=b)
    assert_close(z, zs, 1e-10, "momentum by hand")


def test_generic_decode_carries_the_optimizer_state(x64):
    learner = L.ln_residual(L.linear())
    n, b = 11, 4
    W0, fixed, q, k, v, a, c = _case(learner, n, b, seed=4)
    tx = inner_opt.make("muon")
    z, W_N, s_N = inner_opt._run(learner, tx, W0, q, k, v, a, c, mini_batch=b, fixed=fixed)
    for n1 in (0, 4, 6):
        if n1:
            cut = lambda x: x[:, :, :n1]
            z1, state = inner_opt.prefill(learner, tx, W0, cut(q), cut(k), cut(v), cut(a),
                                          c[:n1], mini_batch=b, fixed=fixed)
            zs = [z1]
        else:
            state, zs = inner_opt.init_state(tx, W0, B), []
        for t in range(n1, n):
            z_t, state = inner_opt.step(learner, tx, state, q[:, :, t], k[:, :, t], v[:, :, t],
                                        a[:, :, t], c[t], mini_batch=b, fixed=fixed)
            zs.append(z_t[:, :, None])
        assert_close(jnp.concatenate(zs, axis=2), z, 1e-10, f"prefill({n1}) + steps")
    # the closed mini-batches' state: 8 tokens are two whole mini-batches
    cut = lambda x: x[:, :, :8]
    _, state = inner_opt.prefill(learner, tx, W0, cut(q), cut(k), cut(v), cut(a), c[:8],
                                 mini_batch=b, fixed=fixed)
    _, W_8, s_8 = inner_opt._run(learner, tx, W0, cut(q), cut(k), cut(v), cut(a), c[:8],
                                 mini_batch=b, fixed=fixed)
    assert_close((state.W, state.opt), (W_8, s_8), 1e-12, "state after whole mini-batches")
    assert state.opt[0].m["W1"].shape[:2] == (B, H)  # a momentum buffer per sequence


def test_generic_remat_groups_leave_the_state_alone(x64):
    """remat_every pads the mini-batch axis to whole groups; momentum and Adam's count would move
    on a padded step, so the padded steps must keep the carry."""
    learner = L.ln_residual(L.linear())
    W0, fixed, q, k, v, a, c = _case(learner, 12, 4, seed=5)  # 3 mini-batches, groups of 2
    tx = inner_opt.make("adam")
    plain = inner_opt._run(learner, tx, W0, q, k, v, a, c, mini_batch=4, fixed=fixed)
    grouped = inner_opt._run(learner, tx, W0, q, k, v, a, c, mini_batch=4, fixed=fixed,
                             remat_every=2)
    assert_close(grouped, plain, 1e-12, "grouped remat")


# ----------------------------------------------------------------------------- layers


def test_ttt_layer_inner_opt_sgd_is_the_plain_layer_and_decodes_with_muon(x64):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 16)))
    kw = dict(mini_batch=4, dtype=jnp.float64, param_dtype=jnp.float64, stats=False)
    plain = make_mixer("ttt_linear", 16, 2, **kw)
    p = plain.init(jax.random.PRNGKey(0), x)
    y = plain.apply(p, x)[0]
    y_sgd = make_mixer("ttt_linear", 16, 2, inner_opt="sgd", **kw).apply(p, x)[0]
    assert_close(y_sgd, y, 1e-10, "inner_opt='sgd' == the dual form")
    muon = make_mixer("ttt_linear", 16, 2, inner_opt="muon", **kw)
    y_muon = muon.apply(p, x)[0]  # the same parameters: the optimizer adds none
    assert rel_err(y_muon, y) > 1e-4
    y1, _, cache = muon.apply(p, x[:, :6], method="prefill")
    assert set(cache) == {"W", "G", "opt", "pos"}
    ys = [y1]
    for t in range(6, 11):
        y_t, cache = muon.apply(p, x[:, t:t + 1], cache, method="step")
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, axis=1), y_muon, 1e-10, "muon layer decode == forward")
    empty = muon.apply(p, 2, method="init_cache")
    assert jax.tree_util.tree_structure(empty) == jax.tree_util.tree_structure(cache)
    with pytest.raises(ValueError, match="unknown 'rmsprop'"):
        make_mixer("ttt_linear", 16, 2, inner_opt="rmsprop")
    with pytest.raises(ValueError, match="kernel='pallas': the fused kernel runs plain"):
        make_mixer("ttt_linear", 16, 2, inner_opt="muon", kernel="pallas", **kw).apply(p, x)


def test_mttt_accepts_inner_optimizers(x64):
    rng = np.random.default_rng(0)
    learner = L.mlp(factor=2)
    W0 = jax.tree_util.tree_map(lambda w: jnp.asarray(0.4 * rng.normal(size=(H, *w.shape))),
                                learner.init(jax.random.PRNGKey(0), D))
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, 9, D))) for _ in range(3))
    lrs = jnp.asarray([0.5, 0.3, 0.2])
    z, W_T, losses = mttt(learner, W0, q, k, v, lrs)
    z2, W2, losses2 = mttt(learner, W0, q, k, v, lrs, inner_opt=inner_opt.make("sgd"))
    assert_close((z2, W2, losses2), (z, W_T, losses), 1e-12, "MTTT with sgd == GD")
    # momentum by hand: W_t = W_{t−1} − η_t m_t, m_t = ∇L(W_{t−1}) + β m_{t−1}
    beta = 0.5
    lossf = lambda W, kk, vv: 0.5 * jnp.mean(jnp.sum((learner.apply(W, kk) - vv) ** 2, -1))
    W = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    m = jax.tree_util.tree_map(jnp.zeros_like, W)
    grad = jax.vmap(jax.vmap(jax.grad(lossf)))
    for eta in lrs:
        m = jax.tree_util.tree_map(lambda m_, g_: g_ + beta * m_, m, grad(W, k, v))
        W = jax.tree_util.tree_map(lambda w, m_, eta=eta: w - eta * m_, W, m)
    _, W3, _ = mttt(learner, W0, q, k, v, lrs, inner_opt=inner_opt.make("momentum", beta=beta))
    assert_close(W3, W, 1e-12, "MTTT momentum by hand")
    x = jnp.asarray(rng.normal(size=(2, 9, 16)), jnp.float32)
    layer = make_mixer("mttt_mlp", 16, 2, steps=2, inner_opt="muon")
    y, aux = layer.apply(layer.init(jax.random.PRNGKey(0), x), x)
    assert y.shape == x.shape and np.isfinite(np.asarray(aux["inner_losses"])).all()
