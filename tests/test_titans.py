"""Titans' memory (ttt/ops/titans.py) and its layer (ttt/layers/titans_layer.py), float64: the
chunk form == the token loop (outputs, final (W, S), every gradient), the identities with
mini-batch TTT-GD and the delta rule (and where the gated delta rule differs), decode replay, the
layer == a token loop written here from its parameters, the registry entry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_models_decode as decode_tests
from conftest import assert_close, rel_err

from ttt.layers import forward_flops, make_mixer, state_size
from ttt.ops import delta, titans
from ttt.ops import learners as L
from ttt.ops.ttt import ttt_primal

B, H, D = 2, 2, 4
MLP = L.mlp(factor=2)
# compiled once per shape (the learner and the sizes are static)
FWD = jax.jit(titans.forward, static_argnums=0,
              static_argnames=("mini_batch", "remat_every", "unroll", "form", "max_grad_norm"))
STEP = jax.jit(titans.step, static_argnums=0, static_argnames=("mini_batch", "max_grad_norm"))
PREFILL = jax.jit(titans.prefill, static_argnums=0,
                  static_argnames=("mini_batch", "max_grad_norm"))


def _case(learner, n, seed=0, S0=False, ends=False):
    """(W0, q, k, v, theta, eta, alpha, S0): W0 far from zero, rates inside (0, 1); ends: a
    fifth of eta and of alpha exactly 0 or 1 (no momentum / keep all of it; keep / forget)."""
    rng = np.random.default_rng(seed)
    per_head = learner.init(jax.random.PRNGKey(seed), D)
    tree = lambda s: jax.tree_util.tree_map(
        lambda w: jnp.asarray(s * rng.normal(size=(H, *w.shape))), per_head)
    W0 = tree(0.4)
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, n, D))) for _ in range(3))
    theta, eta, alpha = (jnp.asarray(rng.uniform(lo, hi, size=(B, H, n)))
                         for lo, hi in ((0.05, 0.5), (0.0, 0.9), (0.0, 0.3)))
    if ends:
        end = lambda x: jnp.where(jnp.asarray(rng.uniform(size=x.shape) < 0.2),
                                  jnp.asarray(rng.integers(0, 2, size=x.shape), x.dtype), x)
        eta, alpha = end(eta), end(alpha)
    return W0, q, k, v, theta, eta, alpha, (tree(0.1) if S0 else None)


def _probe(tree, seed=1):
    """A random linear functional of a pytree (gradients of several outputs at once)."""
    rng = np.random.default_rng(seed)
    return sum(jnp.sum(x * jnp.asarray(rng.normal(size=x.shape)))
               for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- the op


def _chunk_vs_loop(b, n, learner=MLP, fixed=None):
    """From a non-zero momentum S0, some rates at their ends (η, α ∈ {0, 1}: exact products,
    finite gradients): (arguments, run(f, *arguments, **kw) for f = forward or naive)."""
    W0, q, k, v, theta, eta, alpha, S0 = _case(learner, n, S0=True, ends=True)
    assert {0.0, 1.0} <= set(np.asarray(eta).ravel()) and 1.0 in np.asarray(alpha)
    return (W0, q, k, v, theta, eta, alpha), lambda f, *xs, **kw: f(
        learner, *xs, mini_batch=b, S0=S0, fixed=fixed, **kw)


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("b,n", [(1, 9), (4, 10), (16, 21)])
def test_chunk_form_equals_the_token_loop(x64, b, n, form):
    """9 single tokens; chunks of 4 and a partial one of 2; a chunk of 16 and a partial one of 5."""
    args, run = _chunk_vs_loop(b, n)
    assert_close(run(FWD, *args, form=form), run(titans.naive, *args), 1e-10,
                 f"b={b}, {form}: z, W_N, S_N")


@pytest.mark.parametrize("form", ["dual", "primal"])
@pytest.mark.parametrize("b,n", [pytest.param(1, 9, marks=pytest.mark.slow), (16, 21)])
def test_gradients_equal_the_token_loop(x64, b, n, form):
    args, run = _chunk_vs_loop(b, n)
    grads = [jax.grad(lambda *xs, f=f, kw=kw: _probe(run(f, *xs, **kw)), argnums=range(7))(*args)
             for f, kw in ((FWD, {"form": form}), (titans.naive, {}))]
    assert_close(grads[0], grads[1], 1e-9, f"b={b}, {form}: d/d(W0, q, k, v, theta, eta, alpha)")


LN_FIXED = {"scale": jnp.asarray([[1.3, 0.7, 1.1, 0.9]] * H), "bias": jnp.full((H, D), 0.2)}


@pytest.mark.parametrize("learner,fixed,grads", [
    (L.mlp(factor=2, bias=False), None, False), (L.linear(), None, True),
    (L.linear(bias=False), None, False), (L.ln_residual(L.linear()), LN_FIXED, True)],
    ids=["mlp-nobias", "linear", "linear-nobias", "ln"])
def test_dual_form_of_every_dense_chain(x64, learner, fixed, grads):
    """The dual chunk (biases or none, one or two layers, a `post`) == the primal chunk, outputs
    and final states, and gradients where a path is new (a one-layer bias, the post; the MLP's
    are held above); the token loop holds the primal chunk."""
    args, run = _chunk_vs_loop(4, 10, learner, fixed)
    assert_close(run(FWD, *args, form="dual"), run(FWD, *args, form="primal"), 1e-11, "z, W, S")
    if not grads:
        return
    grads = [jax.grad(lambda *xs, form=form: _probe(run(FWD, *xs, form=form)),
                      argnums=range(7))(*args) for form in ("dual", "primal")]
    assert_close(grads[0], grads[1], 1e-9, "d/d(W0, q, k, v, theta, eta, alpha)")


def _median_first_norm(learner, W0, k, v, b, fixed=None, S0=None):
    """The median of the first chunk's gradient lengths ‖u_j‖ (taken at W0): a clip at it
    binds for about half of those tokens (checked) and leaves the others."""
    loss = lambda W, f, kj, vj: L.reconstruction_loss(learner, W, f, kj, vj)
    g = jax.vmap(jax.vmap(jax.grad(loss), in_axes=(0, 0, 0, 0)), in_axes=(None, None, 0, 0))
    norms = np.stack([np.sqrt(sum(np.sum(np.square(x), axis=tuple(range(2, x.ndim)))
                                  for x in jax.tree_util.tree_leaves(
                                      g(W0, fixed, k[:, :, j], v[:, :, j]))))
                      for j in range(b)])
    tau = float(np.median(norms))
    assert norms.min() < 0.7 * tau and norms.max() > 1.3 * tau
    return tau


@pytest.mark.parametrize("learner,fixed", [(MLP, None), (L.ln_residual(L.linear()), LN_FIXED)],
                         ids=["mlp", "ln"])
def test_clipped_gradients_in_every_form(x64, learner, fixed):
    """max_grad_norm τ at the median gradient length: chunk form (dual, primal) == token loop,
    outputs, final states and gradients (b = 16, a partial chunk); the clip binds (the outputs
    move) and a τ no gradient reaches changes nothing."""
    args, run = _chunk_vs_loop(16, 21, learner, fixed)
    W0, q, k, v = args[:4]
    tau = _median_first_norm(learner, W0, k, v, 16, fixed)
    want = run(titans.naive, *args, max_grad_norm=tau)
    for form in ("dual", "primal"):
        assert_close(run(FWD, *args, form=form, max_grad_norm=tau), want, 1e-10, form)
    assert rel_err(want[0], run(titans.naive, *args)[0]) > 1e-3  # the clip binds
    assert_close(run(FWD, *args, max_grad_norm=1e9), run(FWD, *args), 1e-13, "τ never reached")
    grads = [jax.grad(lambda *xs, f=f, kw=kw: _probe(run(f, *xs, max_grad_norm=tau, **kw)),
                      argnums=range(7))(*args)
             for f, kw in ((FWD, {"form": "dual"}), (FWD, {"form": "primal"}),
                           (titans.naive, {}))]
    assert_close(grads[0], grads[2], 1e-9, "dual: d/d(W0, q, k, v, theta, eta, alpha)")
    assert_close(grads[1], grads[2], 1e-9, "primal: d/d(W0, q, k, v, theta, eta, alpha)")


def test_remat_groups_keep_the_carry(x64):
    """remat_every pads the chunk axis with empty chunks (a padded token would still add S to W,
    so they must keep the carry)."""
    W0, q, k, v, theta, eta, alpha, _ = _case(MLP, 21, seed=1)
    plain = FWD(MLP, W0, q, k, v, theta, eta, alpha, mini_batch=4)
    grouped = FWD(MLP, W0, q, k, v, theta, eta, alpha, mini_batch=4, remat_every=4)
    assert_close(grouped, plain, 1e-12, "6 chunks in groups of 4")


def test_no_momentum_no_forgetting_is_minibatch_ttt_gd(x64):
    """eta = alpha = 0: S_t = −θ_t u_t and W_i = W_0 − Σ_{j≤i} θ_j u_j inside a chunk, which is
    `ttt_primal` with the per-token η_ij = θ_j (its (B, H, N) convention)."""
    W0, q, k, v, theta, eta, alpha, _ = _case(MLP, 11, seed=3)
    zero = jnp.zeros_like(theta)
    z, W_N, _ = FWD(MLP, W0, q, k, v, theta, zero, zero, mini_batch=4)
    z_gd, W_gd = ttt_primal(MLP, W0, q, k, v, theta, mini_batch=4)
    assert_close((z, W_N), (z_gd, W_gd), 1e-12, "Titans(eta=alpha=0) vs TTT-GD")
    for name, e, a in (("momentum", eta, zero), ("forgetting", zero, alpha)):  # negative controls
        z_x, _, _ = FWD(MLP, W0, q, k, v, theta, e, a, mini_batch=4)
        assert rel_err(z_x, z_gd) > 1e-3, name


def test_linear_memory_is_the_delta_rule_only_without_the_gate(x64):
    """Linear bias-free memory, b = 1, eta = 0: W_t = (1 − α_t) W_{t−1} + θ_t k_t (v_t −
    W_{t−1}ᵀ k_t)ᵀ. With α = 0 that is the delta rule with β = θ. With α_t = 1 − a_t the gated
    delta rule takes its gradient at the decayed state a_t S_{t−1}; from the same state one token
    apart, W_1 − S_1 = −θ (1 − a) k (S_0ᵀ k)ᵀ exactly."""
    learner = L.linear(bias=False)
    W0, q, k, v, theta, _, alpha, _ = _case(learner, 9, seed=4)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    zero = jnp.zeros_like(theta)
    z, W_N, _ = FWD(learner, W0, q, k, v, theta, zero, zero, mini_batch=1)
    S0 = jnp.broadcast_to(W0["W1"], (B, H, D, D))
    o, S_N = delta.delta_rule(q, k, v, theta, state=S0, chunk=4)
    assert_close((z, W_N["W1"]), (o, S_N), 1e-12, "alpha = 0: the delta rule")
    z_g, _, _ = FWD(learner, W0, q, k, v, theta, zero, alpha, mini_batch=1)
    o_g, _ = delta.delta_rule(q, k, v, theta, log_alpha=jnp.log1p(-alpha), state=S0, chunk=4)
    assert rel_err(z_g, o_g) > 1e-3  # the gated delta rule is another recurrence
    one = lambda x: x[:, :, :1]
    _, W_1, _ = FWD(learner, W0, *map(one, (q, k, v, theta, zero, alpha)),
                               mini_batch=1)
    _, S_1 = delta.delta_rule(*map(one, (q, k, v, theta)), log_alpha=jnp.log1p(-one(alpha)),
                              state=S0)
    k1, th1, a1 = k[:, :, 0], theta[:, :, 0], 1.0 - alpha[:, :, 0]
    want = -jnp.einsum("bh,bhk,bhv->bhkv", th1 * (1.0 - a1), k1,
                       jnp.einsum("bhkv,bhk->bhv", S0, k1))
    assert_close(W_1["W1"] - S_1, want, 1e-12, "one gated token: the difference")


@pytest.mark.parametrize("b,clip", [(1, False), (4, False), (4, True)])
def test_decode_replays_the_forward(x64, b, clip):
    W0, q, k, v, theta, eta, alpha, _ = _case(MLP, 11, seed=5)
    xs = (q, k, v, theta, eta, alpha)
    tau = _median_first_norm(MLP, W0, k, v, b) if clip else None
    z, W_N, S_N = FWD(MLP, W0, *xs, mini_batch=b, max_grad_norm=tau)
    for n1 in (0, 4, 6):
        if n1:
            z1, state = PREFILL(MLP, W0, *(x[:, :, :n1] for x in xs), mini_batch=b,
                                max_grad_norm=tau)
            zs = [z1]
        else:
            state, zs = titans.init_state(W0, B), []
        for t in range(n1, 11):
            z_t, state = STEP(MLP, state, *(x[:, :, t] for x in xs), mini_batch=b,
                              max_grad_norm=tau)
            zs.append(z_t[:, :, None])
        assert_close(jnp.concatenate(zs, axis=2), z, 1e-10, f"b={b}: prefill({n1}) + steps")
        assert_close((state.W, state.S), (W_N, S_N), 1e-10, f"b={b}: final state")
    _, state = PREFILL(MLP, W0, *(x[:, :, :8] for x in xs), mini_batch=b)
    assert_close(state.W_start, state.W, 0.0, "closed chunks: the next one starts at W")
    # negative control: a step that starts from W0, forgetting the prompt
    wrong, _ = STEP(MLP, titans.init_state(W0, B), *(x[:, :, 8] for x in xs), mini_batch=b)
    assert rel_err(wrong, z[:, :, 8]) > 1e-3


def test_wrong_variants_are_caught(x64):
    """Negative controls at the tolerance of the tests above: momentum and forgetting swapped,
    read-before-update, and chunked gradients (b = 4) against the token recurrence (b = 1)."""
    W0, q, k, v, theta, eta, alpha, _ = _case(MLP, 9, seed=6)
    ref, W_ref, _ = titans.naive(MLP, W0, q, k, v, theta, eta, alpha, mini_batch=1)
    swapped, _, _ = FWD(MLP, W0, q, k, v, theta, 1.0 - alpha, 1.0 - eta, mini_batch=1)
    assert rel_err(swapped, ref) > 1e-3
    answer = jax.vmap(jax.vmap(jax.vmap(MLP.apply, in_axes=(None, 0))))
    W_t = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    before = answer(W_t, q[:, :, :1])  # the first token read from W0
    assert rel_err(before, ref[:, :, :1]) > 1e-3
    chunked, _, _ = FWD(MLP, W0, q, k, v, theta, eta, alpha, mini_batch=4)
    assert rel_err(chunked, ref) > 1e-3


def test_bad_arguments_raise(x64):
    W0, q, k, v, theta, eta, alpha, _ = _case(MLP, 5, seed=7)
    with pytest.raises(ValueError, match="mini_batch: expected an integer >= 1"):
        titans.forward(MLP, W0, q, k, v, theta, eta, alpha, mini_batch=0)
    with pytest.raises(ValueError, match=r"eta: expected shape \(B, H, N\)"):
        titans.forward(MLP, W0, q, k, v, theta, eta[:, :, :3], alpha)
    with pytest.raises(ValueError, match="W0: expected a pytree like mlp.init"):
        titans.forward(MLP, {"W1": W0["W1"]}, q, k, v, theta, eta, alpha)
    with pytest.raises(ValueError, match="form='dual': learner 'swiglu' has no dense chain"):
        titans.forward(L.swiglu(), L.swiglu().init(jax.random.PRNGKey(0), D), q, k, v, theta,
                       eta, alpha, form="dual")
    with pytest.raises(ValueError, match="form: unknown .fast."):
        titans.forward(MLP, W0, q, k, v, theta, eta, alpha, form="fast")
    with pytest.raises(ValueError, match="max_grad_norm: expected None or a positive number"):
        titans.forward(MLP, W0, q, k, v, theta, eta, alpha, max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"alpha_t: expected shape \(B, H\)"):
        titans.step(MLP, titans.init_state(W0, B), q[:, :, 0], k[:, :, 0], v[:, :, 0],
                    theta[:, :, 0], eta[:, :, 0], alpha[:, :, 0, None])


# ----------------------------------------------------------------------------- the layer

C, HL, N = 8, 2, 7  # d = 4


def _layer(b, **kw):
    return make_mixer("titans", C, HL, mini_batch=b, mlp_factor=2, inner_bias=True,
                      dtype=jnp.float64, param_dtype=jnp.float64, **kw)


def _reference(p, x, b, base_lr, max_grad_norm=None):
    """The layer token by token from its parameters, written without the package's code
    (momentum off, η ≡ 0, when p has no eta_proj)."""
    x = np.asarray(x)
    Bx, n, _ = x.shape
    d = C // HL
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    silu = lambda z: z * sig(z)
    P = np.concatenate([x @ np.asarray(p[w]["kernel"]) for w in ("wq", "wk", "wv")], axis=-1)
    K, bias = np.asarray(p["conv"]["kernel"])[:, 0], np.asarray(p["conv"]["bias"])
    w = K.shape[0]
    Pp = np.concatenate([np.zeros((Bx, w - 1, 3 * C)), P], axis=1)
    conv = np.stack([sum(Pp[:, t + i] * K[i] for i in range(w)) + bias for t in range(n)], 1)
    q, k, v = (a.reshape(Bx, n, HL, d) for a in np.split(silu(conv), 3, axis=-1))
    q, k = (a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-10) for a in (q, k))
    gate = lambda g: sig(x @ np.asarray(p[g]["kernel"]) + np.asarray(p[g]["bias"]))  # (B, n, H)
    th, al = base_lr * gate("theta_proj"), gate("alpha_proj")
    et = gate("eta_proj") if "eta_proj" in p else np.zeros_like(th)
    mem = {name: np.asarray(a) for name, a in p["memory"].items()}
    norm = p.get("memory_norm")  # ln_residual: f(x) = x + LN(mlp(x)), LN per head

    def f(W, x_, h):
        y = jax.nn.gelu(x_ @ W["W1"] + W["W1b"], approximate=True) @ W["W2"] + W["W2b"]
        if norm is None:
            return y
        y = (y - y.mean()) / jnp.sqrt(((y - y.mean()) ** 2).mean() + 1e-6)
        return x_ + y * np.asarray(norm["scale"])[h] + np.asarray(norm["bias"])[h]

    grad = jax.jit(jax.grad(lambda W, k_, v_, h: 0.5 * jnp.sum((f(W, k_, h) - v_) ** 2)),
                   static_argnums=3)
    z = np.zeros((Bx, n, HL, d))
    for bi in range(Bx):
        for h in range(HL):
            W = {"W1": mem["W1"][h], "W1b": mem["b1"][h], "W2": mem["W2"][h], "W2b": mem["b2"][h]}
            S = {key: np.zeros_like(a) for key, a in W.items()}
            for t in range(n):
                if t % b == 0:
                    W_start = W
                u = {key: np.asarray(a) for key, a in
                     grad(W_start, k[bi, t, h], v[bi, t, h], h).items()}
                if max_grad_norm is not None:  # cut the gradient to length τ
                    size = np.sqrt(sum(np.sum(a * a) for a in u.values()))
                    u = {key: a * min(1.0, max_grad_norm / size) for key, a in u.items()}
                S = {key: et[bi, t, h] * S[key] - th[bi, t, h] * u[key] for key in S}
                W = {key: (1.0 - al[bi, t, h]) * W[key] + S[key] for key in W}
                z[bi, t, h] = np.asarray(f(W, q[bi, t, h], h))
    z = z / np.sqrt((z * z).mean(-1, keepdims=True) + 1e-6) * np.asarray(p["out_norm"]["scale"])
    y = z.reshape(Bx, n, C) * silu(x @ np.asarray(p["wg"]["kernel"]))
    return y @ np.asarray(p["wo"]["kernel"])


def _params(layer, x, seed=0):
    """Initialised parameters with gates and memory moved off their init (so all matter)."""
    p = jax.jit(layer.init)(jax.random.PRNGKey(seed), x)["params"]
    rng = np.random.default_rng(seed)
    bump = lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape))
    p = dict(p, **{g: jax.tree_util.tree_map(bump, p[g])
                   for g in ("theta_proj", "eta_proj", "alpha_proj", "memory", "memory_norm")
                   if g in p})
    p["wo"] = {"kernel": p["wo"]["kernel"] * 30.0}
    return {"params": p}


@pytest.mark.parametrize("b,ln,clip,mom", [(1, False, None, True), (3, False, None, True),
                                            (3, True, None, True), (3, False, 0.3, True),
                                            (3, False, None, False)])
def test_layer_equals_a_token_loop_written_from_its_parameters(x64, b, ln, clip, mom):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, N, C)))
    layer = _layer(b, base_lr=0.7, ln_residual=ln, max_grad_norm=clip, momentum=mom)
    v = _params(layer, x)
    apply = jax.jit(lambda v, x, mult: layer.apply(v, x, ttt_lr_mult=mult))
    y, aux = apply(v, x, 1.0)
    assert aux == {} and y.shape == x.shape
    want = _reference(v["params"], x, b, 0.7, clip)
    assert_close(y, want, 1e-10, f"layer b={b} vs token loop")
    if clip:  # the clip binds
        assert rel_err(want, _reference(v["params"], x, b, 0.7)) > 1e-3
    # ttt_lr_mult scales θ: the reference with base_lr · 0.5
    assert_close(apply(v, x, 0.5)[0], _reference(v["params"], x, b, 0.35, clip), 1e-10,
                 "ttt_lr_mult")


@pytest.mark.parametrize("ln", [False, True])
def test_layer_decodes_as_it_runs(x64, ln):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, N, C)))
    layer = _layer(3, ln_residual=ln)
    v = _params(layer, x, seed=1)
    y, _ = jax.jit(layer.apply)(v, x)
    assert_close(jax.jit(_layer(3, unroll=2, ln_residual=ln).apply)(v, x)[0], y, 1e-12,
                 "unroll=2")
    step = jax.jit(lambda v, x_t, cache: layer.apply(v, x_t, cache, method="step"))
    for n1 in (0, 4):  # 4: a closed chunk of 3 and an open one
        if n1:
            y1, aux, cache = jax.jit(lambda v, x: layer.apply(v, x, method="prefill"))(v, x[:, :n1])
            ys = [y1]
        else:
            cache, ys = layer.apply(v, 2, method="init_cache"), []
        for t in range(n1, N):
            y_t, cache = step(v, x[:, t:t + 1], cache)
            ys.append(y_t)
        assert_close(jnp.concatenate(ys, axis=1), y, 1e-10, f"prefill({n1}) + steps")
    empty = layer.apply(v, 2, method="init_cache")
    assert jax.tree_util.tree_structure(empty) == jax.tree_util.tree_structure(cache)
    fresh, _ = step(v, x[:, 4:5], empty)  # negative control
    assert rel_err(fresh, y[:, 4:5]) > 1e-3


def test_layer_bad_arguments_raise():
    for kw, match in (({"mini_batch": 0}, "mini_batch: expected an integer >= 1"),
                      ({"learner": "rnn"}, "learner: unknown 'rnn'"),
                      ({"base_lr": 0.0}, "base_lr: expected a positive number"),
                      ({"max_grad_norm": -1.0}, "max_grad_norm: expected None or a positive"),
                      ({"mlp_factor": 0}, "mlp_factor: expected an integer >= 1"),
                      ({"unroll": 0}, "unroll: expected an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            make_mixer("titans", C, HL, **kw)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        make_mixer("titans", 9, 2)


def test_registry_costs_follow_the_cache():
    layer = make_mixer("titans", 16, 2)
    x = jnp.zeros((1, 24, 16))
    v = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    cache = jax.eval_shape(lambda v: layer.apply(v, x, method="prefill"), v)[2]
    memory = [cache[key] for key in ("W", "S", "W_start")]
    floats = sum(int(np.prod(a.shape[1:])) for a in jax.tree_util.tree_leaves(memory))
    assert state_size("titans", 16, 2, 24) == floats == 3 * 2 * (2 * 8 * 32)
    assert state_size("titans", 16, 2, 24, inner_bias=True) == 3 * 2 * (2 * 8 * 32 + 32 + 8)
    f = lambda n, **kw: forward_flops("titans", n, 64, 4, **kw)
    assert f(512) == pytest.approx(2 * f(256))
    assert f(256, mini_batch=64) > f(256, mini_batch=16) > f(256, learner="linear")


def test_causal_lm_decodes_with_titans_layers():
    """The registry entry in a 2-layer CausalLM (scanned layers, float32): prefill + steps ==
    the forward, with the prompt ending on a closed chunk or inside one."""
    out = decode_tests.compiled("titans").out
    assert_close(out["decode_b"], out["logits"], 1e-4, "prefill(N1=b) + steps")
    assert_close(out["decode_b2"], out["logits"], 1e-4, "prefill(N1=b+2) + steps")
    assert rel_err(out["wrong_step"], out["logits"][:, decode_tests.MB:decode_tests.MB + 1]) > 1e-3
