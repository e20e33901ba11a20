"""The causal TTT state machine (`ttt.ops.ttt_state`) without Flax: prefill + one-token steps ==
the training forward (outputs, final state and every gradient), the η construction against its
definition, and the inner-loss diagnostics against a direct computation.

Sizes are tiny (B 2, H 2, d 4, b 4, N 11: two whole mini-batches and a partial one), float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.ops import learners, ttt_state
from ttt.ops.ttt import ttt_naive

B, H, D, MB, N = 2, 2, 4, 4, 11
LEARNERS = {
    "linear": learners.ln_residual(learners.linear()),
    "mlp": learners.ln_residual(learners.mlp(factor=2)),
}


def _inputs(learner, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape), jnp.float64)
    q, k, v = arr(B, H, N, D), arr(B, H, N, D), arr(B, H, N, D)
    a = jax.nn.sigmoid(arr(B, H, N))  # gates in (0, 1)
    offset = arr(MB, scale=0.2)
    c = ttt_state.lr_coefficients(jnp.arange(N) % MB, offset, 0.3)  # (N,)
    W0 = jax.vmap(lambda key: learner.init(key, D))(jax.random.split(jax.random.PRNGKey(seed), H))
    W0 = jax.tree_util.tree_map(lambda w: w.astype(jnp.float64) + 0.1, W0)
    fixed = {"scale": 1.0 + arr(H, D, scale=0.1), "bias": arr(H, D, scale=0.1)}
    return q, k, v, a, c, W0, fixed


def _decode(learner, W0, q, k, v, a, c, fixed, n1):
    """prefill(n1 tokens; 0: start from init_state) then one step per remaining token
    -> (z (B, H, N, d), final state)."""
    cut = lambda x: x[:, :, :n1]
    zs, state = [], ttt_state.init_state(W0, B)
    if n1:
        z1, state = ttt_state.prefill(learner, W0, cut(q), cut(k), cut(v), cut(a), c[:n1],
                                      mini_batch=MB, fixed=fixed)
        zs.append(z1)
    for t in range(n1, N):
        z_t, state = ttt_state.step(learner, state, q[:, :, t], k[:, :, t], v[:, :, t],
                                    a[:, :, t], c[t], mini_batch=MB, fixed=fixed)
        zs.append(z_t[:, :, None])
    return jnp.concatenate(zs, axis=2), state


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_prefill_and_steps_equal_forward(x64, name):
    learner = LEARNERS[name]
    q, k, v, a, c, W0, fixed = _inputs(learner)
    z, W_N = ttt_state.forward(learner, W0, q, k, v, a, c, mini_batch=MB, fixed=fixed)
    # a multiple of b, inside a mini-batch, and steps alone from init_state (one for the MLP)
    for n1 in (8, 6, 0) if name == "linear" else (6,):
        z_dec, state = jax.jit(_decode, static_argnums=(0, 8))(learner, W0, q, k, v, a, c,
                                                               fixed, n1)
        assert_close(z_dec, z, 1e-10, f"{name}: prefill({n1}) + steps vs forward")
        assert int(state.pos) == N
        # N = 11 leaves 3 tokens of the last mini-batch open: closing it by hand with the last
        # token's coefficient gives the forward's final state
        closed = jax.tree_util.tree_map(lambda w, g: w - c[N - 1] * g, state.W, state.G)
        assert_close(closed, W_N, 1e-10, f"{name}: open state closed by hand vs W_N")
    # negative control: the state carries information (W0 changes the answers of late tokens)
    z_other, _ = ttt_state.forward(learner, jax.tree_util.tree_map(lambda w: 2 * w, W0),
                                   q, k, v, a, c, mini_batch=MB, fixed=fixed)
    assert rel_err(z_other[:, :, -1], z[:, :, -1]) > 1e-3


def test_decode_gradients_equal_forward_gradients(x64):
    """The decode path is differentiable and has the forward's gradients w.r.t. every input."""
    learner = LEARNERS["linear"]
    q, k, v, a, c, W0, fixed = _inputs(learner, seed=1)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal((B, H, N, D)))

    def loss_forward(q, k, v, a, c, W0, fixed):
        z, _ = ttt_state.forward(learner, W0, q, k, v, a, c, mini_batch=MB, fixed=fixed)
        return jnp.sum(z * ct)

    def loss_decode(q, k, v, a, c, W0, fixed):
        return jnp.sum(_decode(learner, W0, q, k, v, a, c, fixed, 6)[0] * ct)

    args = (q, k, v, a, c, W0, fixed)
    g_f = jax.jit(jax.grad(loss_forward, argnums=tuple(range(7))))(*args)
    g_d = jax.jit(jax.grad(loss_decode, argnums=tuple(range(7))))(*args)
    for name, x, y in zip(("q", "k", "v", "a", "c", "W0", "fixed"), g_d, g_f, strict=True):
        assert_close(x, y, 1e-9, f"d/d{name}")


def test_whole_sequence_mini_batch_never_closes(x64):
    """mini_batch=0: one mini-batch over the sequence; prefill runs every token as a step."""
    learner = learners.linear()
    q, k, v, a, _, W0, _ = _inputs(learners.ln_residual(learner), seed=3)
    W0 = jax.vmap(lambda key: learner.init(key, D))(jax.random.split(jax.random.PRNGKey(0), H))
    W0 = jax.tree_util.tree_map(lambda w: w.astype(jnp.float64), W0)
    c = jnp.full((N,), 0.2)
    z, W_N = ttt_state.forward(learner, W0, q, k, v, a, c, mini_batch=0)
    z_ref, W_ref = ttt_naive(learner, W0, q, k, v, ttt_state.eta_rows(a, c, N), mini_batch=N)
    assert_close(z, z_ref, 1e-10, "whole-sequence forward vs naive")
    z_p, state = ttt_state.prefill(learner, W0, q, k, v, a, c, mini_batch=0)
    assert_close(z_p, z, 1e-10, "prefill vs forward")
    assert rel_err(state.G["W1"], jnp.zeros_like(state.G["W1"])) > 0  # still open
    closed = jax.tree_util.tree_map(lambda w, g: w - c[-1] * g, state.W, state.G)
    assert_close(closed, W_N, 1e-10, "closed by hand vs W_N")


def test_eta_rows_and_coefficients_from_the_definition(x64):
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.uniform(size=(B, H, N)))
    c = jnp.asarray(rng.uniform(size=(N,)))
    rows = np.asarray(ttt_state.eta_rows(a, c, MB))  # (B, H, N, b)
    expect = np.zeros((B, H, N, MB))
    for t in range(N):
        start = (t // MB) * MB
        for j in range(MB):
            if start + j < N:
                expect[:, :, t, j] = c[t] * a[:, :, start + j]
    assert_close(rows, expect, 1e-15, "eta_rows")
    offset = jnp.asarray([0.0, -0.6, 0.1, -0.1])
    got = ttt_state.lr_coefficients(jnp.asarray([0, 1, 2, 3, 0]), offset, 2.0)
    want = [2.0 * max(1 / (i + 1) + float(offset[i]), 0.0) for i in (0, 1, 2, 3, 0)]
    assert_close(got, np.asarray(want), 1e-15, "lr_coefficients")
    assert float(got[1]) == 0.0  # the max(·, 0) clips a negative rate
    x = jnp.asarray(rng.normal(size=(B, N, 6)))
    kernel, bias = jnp.asarray(rng.normal(size=(H, 6))), jnp.asarray(rng.normal(size=(H,)))
    gate = ttt_state.lr_gate(x, kernel, bias)
    assert_close(gate, 1 / (1 + np.exp(-(np.einsum("bnc,hc->bhn", x, kernel)
                                         + np.asarray(bias)[None, :, None]))), 1e-14, "lr_gate")


def test_inner_loss_stats_against_direct_computation(x64):
    """before = error at the state the token's mini-batch started from (W after the previous
    mini-batches); after = error at the state that includes the token's own update."""
    learner = LEARNERS["linear"]
    _, k, v, a, c, W0, fixed = _inputs(learner, seed=5)
    stats = ttt_state.inner_loss_stats(learner, W0, k, v, a, c, mini_batch=MB, fixed=fixed)
    apply = jax.vmap(jax.vmap(learner.apply, in_axes=(0, 0, 0)), in_axes=(0, 0, None))
    W = ttt_state.init_state(W0, B).W
    before, after = [], []
    eta = ttt_state.eta_rows(a, c, MB)
    z_after, _ = ttt_naive(learner, W0, k, k, v, eta, mini_batch=MB, fixed=fixed)  # q = k
    for start in range(0, N, MB):
        stop = min(start + MB, N)
        before.append(apply(W, k[:, :, start:stop], fixed))
        if stop < N:
            _, W = ttt_state.forward(learner, W0, k[:, :, :stop], k[:, :, :stop], v[:, :, :stop],
                                     a[:, :, :stop], c[:stop], mini_batch=MB, fixed=fixed)
        after.append(z_after[:, :, start:stop])
    mse = lambda z: float(np.mean((np.asarray(z) - np.asarray(v)) ** 2))
    init = jax.vmap(learner.apply, in_axes=(0, 1, 0), out_axes=1)(W0, k, fixed)
    assert_close(stats["inner_loss_init"], mse(init), 1e-12, "init")
    assert_close(stats["inner_loss_before"], mse(jnp.concatenate(before, 2)), 1e-12, "before")
    assert_close(stats["inner_loss_after"], mse(jnp.concatenate(after, 2)), 1e-12, "after")
    assert stats["inner_loss_after"] < stats["inner_loss_before"]  # the update helps
