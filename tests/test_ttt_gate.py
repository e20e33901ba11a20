"""Forget gates in causal mini-batch TTT (docs/design.md §4.11), float64.

With Γ_j = Π_{s≤j} a_s from the mini-batch start, g_j = ∇l(Γ_j W; k_j, v_j) and
W_i = Γ_i W − Σ_{j≤i} η_ij (Γ_i/Γ_j) g_j. Held here: primal == dual == naive with a gate (outputs,
final state, gradients w.r.t. q, k, v, η, log_alpha, W0), log_alpha = 0 == no gate, mini-batch 1
with a bias-free linear learner == the gated delta rule (chunked and recurrent), negative controls
(gradient at the undecayed W, decay after the update), decoding == forward (ops and TTTMixer),
the layer's parameters and the argument errors.

Sizes are tiny (B 2, H 2, d 4; N 7 with b 3: two whole mini-batches and a partial one).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ttt.layers import costs
from ttt.layers.ttt_layer import TTTMixer
from ttt.ops import learners as L
from ttt.ops import ttt_state
from ttt.ops.delta import delta_rule, delta_rule_recurrent
from ttt.ops.ttt import ttt, ttt_decode_step, ttt_dual, ttt_naive, ttt_primal

B, H, D, N, MB = 2, 2, 4, 7, 3
LEARNERS = {
    "linear": L.linear(),
    "mlp": L.mlp(factor=2),
    "ln_linear": L.ln_residual(L.linear()),
    "ln_mlp": L.ln_residual(L.mlp(factor=2)),
    "linear_nobias": L.linear(bias=False),
}
WORST = {}  # identity -> worst relative error seen (printed with `pytest -s`)


def _record(name, err):
    WORST[name] = max(WORST.get(name, 0.0), err)
    print(f"\n  worst rel err {name}: {WORST[name]:.2e}")


def make_case(name, layout="token", seed=0):
    """Random (learner, W0, q, k, v, eta, log_alpha, fixed); decays in [e^-1, 1]."""
    lrn = LEARNERS[name]
    rng = np.random.default_rng(seed)
    arr = lambda *shape, scale=1.0: jnp.asarray(scale * rng.normal(size=shape), jnp.float64)
    per_head = lrn.init(jax.random.PRNGKey(seed), D)
    W0 = jax.tree_util.tree_map(lambda w: arr(H, *w.shape, scale=0.4), per_head)
    q, k, v = arr(B, H, N, D), arr(B, H, N, D), arr(B, H, N, D)
    eta_shape = (B, H, N) if layout == "token" else (B, H, N, MB)
    eta = jnp.asarray(rng.uniform(0.05, 0.4, size=eta_shape))
    log_alpha = jnp.asarray(-rng.uniform(0.0, 1.0, size=(B, H, N)))
    fixed = None
    if name.startswith("ln_"):
        fixed = {"scale": 1.0 + arr(H, D, scale=0.2), "bias": arr(H, D, scale=0.2)}
    return lrn, W0, q, k, v, eta, log_alpha, fixed


def _probe(z, W_N, seed=1):
    """A random linear functional of the outputs and the final state."""
    rng = np.random.default_rng(seed)
    leaves = jax.tree_util.tree_leaves(W_N)
    return jnp.sum(z * rng.normal(size=z.shape)) + sum(
        jnp.sum(w * rng.normal(size=w.shape)) for w in leaves)


@functools.cache
def _grads(fn, name):
    """jit: (grads of the probe of fn's (z, W_N) w.r.t. q, k, v, eta, log_alpha, W0; (z, W_N))."""
    lrn = LEARNERS[name]

    def loss(q, k, v, eta, log_alpha, W0, fixed):
        z, W_N = fn(lrn, W0, q, k, v, eta, mini_batch=MB, fixed=fixed, log_alpha=log_alpha)
        return _probe(z, W_N), (z, W_N)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True))


# ----------------------------------------------------------------------------- the three forms


_slow = pytest.mark.slow


@pytest.mark.parametrize("name,layout,naive_grads", [
    ("linear", "token", True),
    ("ln_mlp", "row", False),
    pytest.param("mlp", "row", True, marks=_slow),
    pytest.param("ln_linear", "token", True, marks=_slow),
])
def test_primal_dual_naive_agree_with_gate(x64, name, layout, naive_grads):
    lrn, W0, q, k, v, eta, la, fixed = make_case(name, layout)
    z_n, W_n = ttt_naive(lrn, W0, q, k, v, eta, mini_batch=MB, fixed=fixed, log_alpha=la)
    args = (q, k, v, eta, la, W0, fixed)
    out = {fn.__name__: _grads(fn, name)(*args) for fn in (ttt_primal, ttt_dual)}
    for form, (_, (z, W_N)) in out.items():
        _record(f"{form} vs naive: z", assert_close(z, z_n, 1e-10, f"{form} z"))
        _record(f"{form} vs naive: W_N", assert_close(W_N, W_n, 1e-10, f"{form} W_N"))
    g_p, g_d = out["ttt_primal"][0], out["ttt_dual"][0]
    _record("dual vs primal: grads", assert_close(g_d, g_p, 1e-10, "dual vs primal grads"))
    if naive_grads:
        g_n = _grads(ttt_naive, name)(*args)[0]
        _record("primal vs naive: grads", assert_close(g_p, g_n, 1e-10, "primal vs naive grads"))


def test_zero_log_decay_is_no_gate(x64):
    lrn, W0, q, k, v, eta, la, fixed = make_case("ln_mlp")
    want = ttt_dual(lrn, W0, q, k, v, eta, mini_batch=MB, fixed=fixed)
    got = ttt_dual(lrn, W0, q, k, v, eta, mini_batch=MB, fixed=fixed, log_alpha=jnp.zeros_like(la))
    _record("log_alpha = 0 vs no gate", assert_close(got, want, 1e-12, "dual"))
    # the gate matters: with the random decays the answers differ
    z_gated, _ = ttt_dual(lrn, W0, q, k, v, eta, mini_batch=MB, fixed=fixed, log_alpha=la)
    assert not np.allclose(z_gated, want[0], rtol=1e-3)


def test_strong_decay_forgets_the_start_state(x64):
    """log_alpha = −60 on each mini-batch's first token: Γ_j ≈ 0 for every token, so W0 cannot
    matter (and the exp of masked differences stays finite)."""
    lrn, W0, q, k, v, eta, _, fixed = make_case("ln_linear")
    first = (jnp.arange(N) % MB == 0)
    la = jnp.broadcast_to(jnp.where(first, -60.0, -0.1), (B, H, N))
    other = jax.tree_util.tree_map(lambda w: w + 1.0, W0)
    z1, W1 = ttt_dual(lrn, W0, q, k, v, eta, mini_batch=MB, fixed=fixed, log_alpha=la)
    z2, W2 = ttt_dual(lrn, other, q, k, v, eta, mini_batch=MB, fixed=fixed, log_alpha=la)
    assert np.isfinite(np.asarray(z1)).all()
    assert_close((z1, W1), (z2, W2), 1e-12, "strong decay")


# ----------------------------------------------------------------------------- the delta rule


def test_minibatch_one_is_the_gated_delta_rule(x64):
    """b = 1, f(x) = x W, no LN: W_t = a_t W_{t−1} − η_t ∇l(a_t W_{t−1}) is the gated delta rule
    with β = η, S0 = W0 (per sequence); o_t = S_tᵀ q_t is z_t = q_t W_t."""
    lrn, _, q, k, v, eta, la, _ = make_case("linear_nobias", seed=3)
    S0 = jnp.asarray(0.3 * np.random.default_rng(4).normal(size=(B, H, D, D)))
    o_r, S_r = delta_rule_recurrent(q, k, v, eta, log_alpha=la, state=S0)
    o_c, S_c = delta_rule(q, k, v, eta, log_alpha=la, state=S0, chunk=4)
    for fn in (ttt_primal, ttt_dual):
        z, W_N = fn(lrn, {"W1": S0}, q, k, v, eta, mini_batch=1, log_alpha=la)
        for ref, (o, S) in (("recurrent", (o_r, S_r)), ("chunked", (o_c, S_c))):
            _record(f"b=1 vs delta_rule_{ref}: z", assert_close(z, o, 1e-10, fn.__name__))
            _record(f"b=1 vs delta_rule_{ref}: W_N",
                    assert_close(W_N["W1"], S, 1e-10, fn.__name__))


def _recurrence(k, v, eta, la, S0, q, variant):
    """Gated b = 1 updates token by token: "right" (decay, then the gradient at the decayed
    state) and two deliberately wrong orders (negative controls)."""
    S, zs = S0, []
    for t in range(N):
        a = jnp.exp(la[:, :, t])[..., None, None]  # (B, H, 1, 1)
        kt, vt = k[:, :, t], v[:, :, t]
        # ∇_S ½‖Sᵀk − v‖² = k (Sᵀk − v)ᵀ: (B, H, dk, dv)
        grad = lambda S_: jnp.einsum("bhk,bhv->bhkv", kt,
                                     jnp.einsum("bhk,bhkv->bhv", kt, S_) - vt)
        beta = eta[:, :, t][..., None, None]
        if variant == "right":
            S = a * S - beta * grad(a * S)
        elif variant == "gradient at the undecayed W":
            S = a * S - beta * grad(S)
        else:  # "decay after the update"
            S = a * (S - beta * grad(S))
        zs.append(jnp.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return jnp.stack(zs, axis=2)


def test_negative_controls_differ(x64):
    lrn, _, q, k, v, eta, la, _ = make_case("linear_nobias", seed=3)
    S0 = jnp.asarray(0.3 * np.random.default_rng(4).normal(size=(B, H, D, D)))
    z, _ = ttt_primal(lrn, {"W1": S0}, q, k, v, eta, mini_batch=1, log_alpha=la)
    assert_close(_recurrence(k, v, eta, la, S0, q, "right"), z, 1e-10, "the right order")
    for variant in ("gradient at the undecayed W", "decay after the update"):
        wrong = _recurrence(k, v, eta, la, S0, q, variant)
        assert not np.allclose(wrong, z, rtol=1e-3, atol=1e-6), variant


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["ln_mlp", pytest.param("linear", marks=_slow)])
def test_prefill_and_steps_equal_forward_with_gate(x64, name):
    lrn, W0, q, k, v, a, la, fixed = make_case(name)
    c = ttt_state.lr_coefficients(jnp.arange(N) % MB, jnp.full((MB,), 0.1), 0.5)  # (N,)
    kw = dict(mini_batch=MB, fixed=fixed)
    z, W_N = ttt_state.forward(lrn, W0, q, k, v, a, c, log_alpha=la, **kw)
    n1 = 4  # one whole mini-batch through the forward, one open
    cut = lambda x: x[:, :, :n1]
    z1, state = ttt_state.prefill(lrn, W0, cut(q), cut(k), cut(v), cut(a), c[:n1],
                                  log_alpha=cut(la), **kw)
    zs = [z1]
    step = jax.jit(lambda state, *x, fixed: ttt_state.step(lrn, state, *x[:-1], mini_batch=MB,
                                                           fixed=fixed, log_alpha_t=x[-1]))
    for t in range(n1, N):
        z_t, state = step(state, q[:, :, t], k[:, :, t], v[:, :, t], a[:, :, t], c[t],
                          la[:, :, t], fixed=fixed)
        zs.append(z_t[:, :, None])
    _record("decode vs forward: z", assert_close(jnp.concatenate(zs, 2), z, 1e-10, "z"))
    # N = 7 is not a whole number of mini-batches: the state holds the open one (W decayed to
    # the last token, G); closing it by hand gives the forward's W_N
    W_closed = jax.tree_util.tree_map(lambda w, g: w - c[N - 1] * g, state.W, state.G)
    _record("decode vs forward: W_N", assert_close(W_closed, W_N, 1e-10, "W_N"))


def test_decode_step_decays_state_before_the_token(x64):
    """ttt_decode_step with log_alpha_t == the ungated step from (a W, a G)."""
    lrn, W0, q, k, v, a, la, fixed = make_case("ln_linear")
    W = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    G = jax.tree_util.tree_map(lambda w: 0.1 * w + 0.05, W)
    c_t = jnp.full((B, H), 0.3)
    z, G_new, W_new = ttt_decode_step(lrn, W, G, q[:, :, 0], k[:, :, 0], v[:, :, 0], a[:, :, 0],
                                      c_t, fixed=fixed, log_alpha_t=la[:, :, 0])
    scale = lambda t: jax.tree_util.tree_map(
        lambda x: jnp.exp(la[:, :, 0]).reshape(B, H, *[1] * (x.ndim - 2)) * x, t)
    z_ref, G_ref = ttt_decode_step(lrn, scale(W), scale(G), q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                   a[:, :, 0], c_t, fixed=fixed)
    assert_close((z, G_new, W_new), (z_ref, G_ref, scale(W)), 1e-12, "decode step")


def _mixer(learner, backbone, **kw):
    return TTTMixer(width=8, num_heads=H, learner=learner, backbone=backbone, mini_batch=MB,
                    gate=True, dtype=jnp.float64, param_dtype=jnp.float64, **kw)


@pytest.mark.parametrize("learner,backbone,stats", [
    ("linear", "transformer", False),
    ("mlp", "mamba", False),
    pytest.param("mlp", "transformer", True, marks=_slow),
])
def test_mixer_with_gate_decodes_as_forward(x64, learner, backbone, stats):
    m = _mixer(learner, backbone, stats=stats)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(B, N, 8)))
    params = m.init(jax.random.PRNGKey(0), method=m._params)  # parameters only
    y, aux = jax.jit(m.apply)(params, x)
    assert bool(aux) == stats
    y1, _, cache = m.apply(params, x[:, :4], method=m.prefill)
    ys = [y1]
    step = jax.jit(lambda p, x_t, cache: m.apply(p, x_t, cache, method=m.step))
    for t in range(4, N):
        y_t, cache = step(params, x[:, t : t + 1], cache)
        ys.append(y_t)
    _record("TTTMixer(gate) decode vs forward",
            assert_close(jnp.concatenate(ys, 1), y, 1e-10, "mixer decode"))
    # the gate is used: a stronger decay changes the output
    strong = jax.tree_util.tree_map(lambda p: p, params)
    strong["params"]["forget_gate"]["A_log"] = params["params"]["forget_gate"]["A_log"] + 5.0
    assert not np.allclose(jax.jit(m.apply)(strong, x)[0], y, rtol=1e-6)
    if stats:  # the grouped remat path threads the gate alike
        y_r, _ = m.clone(remat_every=1).apply(params, x)  # groups of one mini-batch
        _record("TTTMixer(gate) remat vs plain", assert_close(y_r, y, 1e-10, "mixer remat"))


def test_mixer_gate_parameters_and_init():
    def init(**kw):
        m = TTTMixer(width=8, num_heads=H, mini_batch=MB, **kw)
        return m.init(jax.random.PRNGKey(0), method=m._params)  # parameters only, no forward

    plain, gated = init(), init(gate=True)
    assert "forget_gate" not in plain["params"]  # gate=False: no new parameter
    g = gated["params"].pop("forget_gate")
    assert jax.tree_util.tree_structure(gated) == jax.tree_util.tree_structure(plain)
    assert g["kernel"].shape == (8, H) and g["A_log"].shape == g["dt_bias"].shape == (H,)
    A = np.exp(np.asarray(g["A_log"]))
    dt = np.asarray(jax.nn.softplus(g["dt_bias"]))
    assert ((A >= 1e-4) & (A <= 16.0)).all() and ((dt >= 1e-3 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
    fields = {f.name for f in dataclasses.fields(TTTMixer)} - {"parent", "name"}
    attrs = lambda m: {f: getattr(m, f) for f in fields}
    m = TTTMixer(width=8, num_heads=H)
    extra = costs.ttt_flops(64, 8, H, attrs(m.clone(gate=True))) - costs.ttt_flops(64, 8, H,
                                                                                 attrs(m))
    assert extra == 2.0 * 64 * 8 * H


# ----------------------------------------------------------------------------- errors


def test_gate_argument_errors(x64):
    lrn, W0, q, k, v, eta, la, fixed = make_case("linear")
    with pytest.raises(ValueError, match="pallas"):
        ttt(lrn, W0, q, k, v, eta, mini_batch=MB, log_alpha=la, kernel="pallas")
    with pytest.raises(ValueError, match="pallas"):
        ttt_dual(lrn, W0, q, k, v, eta, mini_batch=MB, log_alpha=la, kernel="pallas")
    with pytest.raises(ValueError, match="log_alpha"):
        ttt_primal(lrn, W0, q, k, v, eta, mini_batch=MB, log_alpha=-la)  # positive log-decays
    with pytest.raises(ValueError, match="log_alpha"):
        ttt_dual(lrn, W0, q, k, v, eta, mini_batch=MB, log_alpha=la[:, :, :-1])
    with pytest.raises(ValueError, match="gate=True"):
        TTTMixer(width=8, num_heads=H, gate=True, inner_opt="sgd")
    with pytest.raises(ValueError, match="gate=True"):
        TTTMixer(width=8, num_heads=H, gate=True, kernel="pallas")
