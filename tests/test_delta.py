"""The delta rule (ttt.ops.delta): the chunked form equals the recurrence (outputs, final state,
gradients), decode steps replay the forward, and the ungated rule is causal TTT with a bias-free
linear inner learner and mini-batch 1. Every equivalence is checked in float64 to 1e-10 relative
error and prints the error it measured (pytest -s shows them)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import rel_err
from ttt.ops import (
    delta_rule,
    delta_rule_decode_step,
    delta_rule_recurrent,
    linear,
    ttt_primal,
)
from ttt.ops.delta import unit_lower_inverse

TOL = 1e-10
B, H, DK, DV = 2, 2, 6, 4
N = 37  # most tests share one length (and chunk 8), so the compiled ops are reused


def _inputs(n, seed=0, gate=True, state=True):
    """q, k (unit-norm keys), v, beta in (0, 1), log_alpha in (-0.5, 0] or None, S0 or None."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape))
    q, k, v = normal(B, H, n, DK), normal(B, H, n, DK), normal(B, H, n, DV)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jnp.asarray(rng.uniform(size=(B, H, n)))
    log_alpha = jnp.asarray(-0.5 * rng.uniform(size=(B, H, n))) if gate else None
    S0 = normal(B, H, DK, DV) if state else None
    return q, k, v, beta, log_alpha, S0


def _report(what, err):
    print(f"{what}: max relative error {err:.2e}")
    assert err <= TOL, f"{what}: {err:.3e} > {TOL:.0e}"
    return err


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("n, chunk", [(37, 8), (37, 16), (32, 8), (37, 1), (5, 64)])
def test_chunked_equals_recurrent(x64, gate, state, n, chunk):
    q, k, v, beta, la, S0 = _inputs(n, gate=gate, state=state)
    o, S = delta_rule(q, k, v, beta, log_alpha=la, chunk=chunk, state=S0)
    o_ref, S_ref = delta_rule_recurrent(q, k, v, beta, log_alpha=la, state=S0)
    tag = f"chunk={chunk} N={n} gate={gate} state={state}"
    _report(f"{tag} o", rel_err(o, o_ref))
    _report(f"{tag} S", rel_err(S, S_ref))


@pytest.mark.parametrize("gate", [True, False])
def test_gradients_match(x64, gate):
    q, k, v, beta, la, S0 = _inputs(N, seed=1, gate=gate)
    rng = np.random.default_rng(7)
    Ro = jnp.asarray(rng.standard_normal((B, H, N, DV)))
    RS = jnp.asarray(rng.standard_normal((B, H, DK, DV)))

    def loss(fn, *args):
        q_, k_, v_, b_, a_, s_ = args
        o, S = fn(q_, k_, v_, b_, log_alpha=a_, state=s_)
        return jnp.sum(o * Ro) + jnp.sum(S * RS)

    argnums = tuple(range(1, 7))
    chunked = lambda *a, **kw: delta_rule(*a, chunk=8, **kw)
    g = jax.grad(loss, argnums=argnums)(chunked, q, k, v, beta, la, S0)
    g_ref = jax.grad(loss, argnums=argnums)(delta_rule_recurrent, q, k, v, beta, la, S0)
    for name, a, e in zip(("q", "k", "v", "beta", "log_alpha", "state"), g, g_ref, strict=True):
        if name == "log_alpha" and not gate:
            assert a is None and e is None
            continue
        assert np.all(np.isfinite(np.asarray(a))), name
        _report(f"grad {name} gate={gate}", rel_err(a, e))


@pytest.mark.parametrize("c", [1, 5, 8, 13])
def test_unit_lower_inverse(x64, c):
    """(I + A) T = I for strictly lower A (c a power of two or not), and the custom gradient
    equals the gradient of a dense inverse."""
    rng = np.random.default_rng(c)
    A = jnp.tril(jnp.asarray(rng.standard_normal((3, c, c))), -1)
    T = unit_lower_inverse(A)
    eye = jnp.eye(c)
    _report(f"(I + A) T = I, c={c}", float(jnp.max(jnp.abs((eye + A) @ T - eye))))
    R = jnp.asarray(rng.standard_normal((3, c, c)))
    g = jax.grad(lambda A: jnp.sum(unit_lower_inverse(A) * R))(A)
    g_ref = jax.grad(lambda A: jnp.sum(jnp.linalg.inv(eye + jnp.tril(A, -1)) * R))(A)
    _report(f"inverse gradient c={c}", rel_err(g, g_ref))


def test_float32_long_chunk_is_accurate():
    """float32, chunk 64, keys strongly correlated (the hard case for the chunk's inverse):
    the chunked form stays within 1e-4 of the float64 recurrence."""
    rng = np.random.default_rng(11)
    n, d = 256, 16
    base = rng.standard_normal((1, 1, 1, d))
    k = base + 0.1 * rng.standard_normal((1, 2, n, d))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    q, v = rng.standard_normal((1, 2, n, d)), rng.standard_normal((1, 2, n, d))
    beta = rng.uniform(0.5, 1.0, (1, 2, n))
    la = -0.05 * rng.uniform(size=(1, 2, n))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    o, S = delta_rule(f32(q), f32(k), f32(v), f32(beta), log_alpha=f32(la), chunk=64)
    S_ref, o_ref = np.zeros((1, 2, d, d)), np.zeros((1, 2, n, d))  # the recurrence in numpy
    for t in range(n):
        S_ref = np.exp(la[..., t])[..., None, None] * S_ref
        u = beta[..., t, None] * (v[:, :, t] - np.einsum("bhkv,bhk->bhv", S_ref, k[:, :, t]))
        S_ref = S_ref + np.einsum("bhk,bhv->bhkv", k[:, :, t], u)
        o_ref[:, :, t] = np.einsum("bhkv,bhk->bhv", S_ref, q[:, :, t])
    err = max(rel_err(o, o_ref), rel_err(S, S_ref))
    print(f"float32 chunk 64 vs float64 recurrence: {err:.2e}")
    assert err <= 1e-4


def test_decode_steps_replay_forward(x64):
    q, k, v, beta, la, S0 = _inputs(N, seed=2)
    o_ref, S_ref = delta_rule(q, k, v, beta, log_alpha=la, chunk=8, state=S0)
    step = jax.jit(delta_rule_decode_step)
    S, outs = S0, []
    for t in range(N):
        o_t, S = step(S, q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t],
                                        la[:, :, t])
        outs.append(o_t)
    _report("decode o", rel_err(jnp.stack(outs, axis=2), o_ref))
    _report("decode S", rel_err(S, S_ref))


def test_zero_beta_keeps_state(x64):
    q, k, v, beta, _, S0 = _inputs(N, seed=3, gate=False)
    o, S = delta_rule(q, k, v, jnp.zeros_like(beta), chunk=8, state=S0)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(S0))
    _report("beta=0 o", rel_err(o, jnp.einsum("bhnd,bhdv->bhnv", q, S0)))


def test_identity_with_ttt_primal(x64):
    """Ungated delta rule == causal TTT, learner linear(bias=False), mini-batch 1, η_t = β_t,
    W0 = {"W1": S0}. The library's inner loss is ½‖f(k; W) − v‖² with f(k; W) = k W1 = W1ᵀ k, so
    its gradient is k (W1ᵀ k − v)ᵀ and one step of rate β is exactly the delta rule's update; the
    answer f(q; W_t) = W_tᵀ q is the read after the update."""
    q, k, v, beta, _, S0 = _inputs(N, seed=4, gate=False)
    o, S = delta_rule(q, k, v, beta, chunk=8, state=S0)
    z, W = ttt_primal(linear(d_out=DV, bias=False), {"W1": S0}, q, k, v, beta, mini_batch=1)
    _report("ttt_primal identity o", rel_err(o, z))
    _report("ttt_primal identity S", rel_err(S, W["W1"]))


@functools.partial(jax.jit, static_argnums=(6, 7))
def _variant_recurrence(q, k, v, beta, log_alpha, S0, read_first, decay_prediction=True):
    """The recurrence with a deliberate change, for the negative controls."""

    def step(S, x):
        q_t, k_t, v_t, b_t, la_t = x  # (B, H, dk) ×2, (B, H, dv), (B, H) ×2
        a = jnp.exp(la_t)[..., None, None]
        pred_S = a * S if decay_prediction else S
        u = b_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", pred_S, k_t))
        S_new = a * S + jnp.einsum("bhk,bhv->bhkv", k_t, u)
        return S_new, jnp.einsum("bhkv,bhk->bhv", S if read_first else S_new, q_t)

    major = lambda x: jnp.moveaxis(x, 2, 0)
    S, o = jax.lax.scan(step, S0, tuple(map(major, (q, k, v, beta, log_alpha))))
    return jnp.moveaxis(o, 0, 2), S


def test_negative_controls(x64):
    """Read-then-update, or a prediction from the undecayed state, is far from the op: the
    equivalence tests above would catch either mistake."""
    q, k, v, beta, la, S0 = _inputs(N, seed=5)
    o, _ = delta_rule(q, k, v, beta, log_alpha=la, chunk=8, state=S0)
    o_read_first, _ = _variant_recurrence(q, k, v, beta, la, S0, read_first=True)
    o_undecayed, _ = _variant_recurrence(q, k, v, beta, la, S0, read_first=False,
                                         decay_prediction=False)
    o_same, _ = _variant_recurrence(q, k, v, beta, la, S0, read_first=False)
    _report("control (unchanged recurrence)", rel_err(o, o_same))
    for what, wrong in (("read-then-update", o_read_first), ("undecayed prediction", o_undecayed)):
        err = rel_err(wrong, o)
        print(f"negative control {what}: relative error {err:.2e}")
        assert err > 1e-2, what


def _bad_calls():
    q, k, v, beta, la, S0 = _inputs(6, gate=True, state=True)
    return {
        "positive log_alpha": lambda: delta_rule(q, k, v, beta, log_alpha=la + 1.0),
        "k width": lambda: delta_rule(q, k[..., :3], v, beta),
        "v length": lambda: delta_rule(q, k, v[:, :, :5], beta),
        "beta shape": lambda: delta_rule(q, k, v, beta[..., None]),
        "state shape": lambda: delta_rule(q, k, v, beta, state=S0[..., :2]),
        "chunk 0": lambda: delta_rule(q, k, v, beta, chunk=0),
        "chunk float": lambda: delta_rule(q, k, v, beta, chunk=2.0),
        "recurrent log_alpha": lambda: delta_rule_recurrent(q, k, v, beta, log_alpha=-la + 0.1),
        "decode state": lambda: delta_rule_decode_step(S0[..., :2], q[:, :, 0], k[:, :, 0],
                                                       v[:, :, 0], beta[:, :, 0]),
        "decode log_alpha": lambda: delta_rule_decode_step(S0, q[:, :, 0], k[:, :, 0], v[:, :, 0],
                                                           beta[:, :, 0], la[:, :, 0] + 1.0),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_one_line(x64, case):
    with pytest.raises(ValueError) as info:
        _bad_calls()[case]()
    message = str(info.value)
    print(f"{case}: {message}")
    assert message and "\n" not in message
    named = {"positive log_alpha": "log_alpha", "k width": "k", "v length": "v",
             "beta shape": "beta", "state shape": "state", "chunk 0": "chunk",
             "chunk float": "chunk", "recurrent log_alpha": "log_alpha", "decode state": "S",
             "decode log_alpha": "log_alpha_t"}[case]
    assert message.startswith(f"{named}:"), message
