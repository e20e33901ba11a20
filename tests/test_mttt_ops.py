"""MTTT inner loop: E1 (one GD step of a linear learner == non-causal linear attention), T = 0,
monotone inner loss, SGD chunks, and the scan against a naive Python loop (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.ops import learners
from ttt.ops.linear_attn import linear_attention
from ttt.ops.mttt import mttt, sgd_chunks

B, H, N, DH, C = 2, 2, 10, 4, 6  # N = 10 is not a multiple of T = 3 or 4

LINEAR = learners.linear(bias=False)
MLP = learners.mlp(factor=2)


def _tiny_learner():
    """A learner outside learners.py with a nested pytree state: f(x) = tanh(x A) B + c."""

    def init(key, d_in):
        ka, kb = jax.random.split(key)
        return {"A": jax.random.normal(ka, (d_in, 3)), "out": (jax.random.normal(kb, (3, d_in)),)}

    def apply(W, x, fixed=None):
        return jnp.tanh(x @ W["A"]) @ W["out"][0]

    return learners.Learner("tiny", init, apply)


TINY = _tiny_learner()


def _arrays(dtype, seed=0, d_v=DH):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((B, H, N, DH)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, H, N, d_v)), dtype)
    return q, k, v


def _W0(learner, dtype, seed=1, scale=1.0):
    """Per-head W0 (leading H) from numpy draws shaped like learner.init."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: learner.init(key, DH), jax.random.PRNGKey(0))
    draw = lambda s: jnp.asarray(scale * rng.standard_normal((H, *s.shape)) / np.sqrt(DH), dtype)
    return jax.tree_util.tree_map(draw, shapes)


def _decoder(dtype, seed=2):
    """MTTT's decoder r = LN_h(y G_h + g_bias) (docs/design.md §9), params with leading H."""
    rng = np.random.default_rng(seed)
    params = {
        "G": rng.standard_normal((H, DH, C)) / np.sqrt(DH),
        "g": rng.standard_normal((H, C)) * 0.1,
        "scale": 1.0 + 0.1 * rng.standard_normal((H, C)),
        "bias": 0.1 * rng.standard_normal((H, C)),
    }

    def decode(y, p):  # (m, dh) -> (m, C)
        return learners.layer_norm(y @ p["G"] + p["g"], p["scale"], p["bias"])

    return decode, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)


def _naive_mttt(learner, W0, q, k, v, lrs, *, decode=None, dparams=None, loss_norm=1.0, sets=None):
    """A Python loop over the T steps with jax.grad on a directly written loss.

    Heads and sequences are independent, so one jax.grad of the loss summed over (B, H) gives every
    head its own gradient. sets[t]: (B, H, |S_t|) token indices of step t (None = all, i.e. "gd").
    Returns (z (B, H, N, d_out), W_T leading (B, H), losses (B, H, T + 1)).
    """
    W = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (B, *x.shape)), W0)  # leading (B, H)

    def head_loss(W, dp, k_S, v_S):  # one head: k_S (m, d_in), v_S (m, d_v)
        y = learner.apply(W, k_S, None)
        r = y if decode is None else decode(y, dp)
        return jnp.sum((r - v_S) ** 2) / (2 * k_S.shape[0] * loss_norm)

    dp_axis = None if dparams is None else 0
    losses_bh = jax.vmap(jax.vmap(head_loss, in_axes=(0, dp_axis, 0, 0)), in_axes=(0, None, 0, 0))
    total = lambda W, k_S, v_S: jnp.sum(losses_bh(W, dparams, k_S, v_S))
    history = [losses_bh(W, dparams, k, v)]  # (B, H) each
    for t in range(lrs.shape[0]):
        k_S, v_S = k, v
        if sets is not None:
            idx = jnp.asarray(sets[t])[..., None]  # (B, H, |S_t|, 1)
            k_S = jnp.take_along_axis(k, idx, axis=2)  # (B, H, |S_t|, d_in)
            v_S = jnp.take_along_axis(v, idx, axis=2)  # (B, H, |S_t|, d_v)
        g = jax.grad(total)(W, k_S, v_S)
        W = jax.tree_util.tree_map(lambda w, gw, t=t: w - lrs[t] * gw, W, g)
        history.append(losses_bh(W, dparams, k, v))
    z = jax.vmap(jax.vmap(lambda W, x: learner.apply(W, x, None)))(W, q)  # (B, H, N, d_out)
    return z, W, jnp.stack(history, axis=-1)


def _sgd_sets(key, T):
    """The token sets mttt's "sgd" mode draws (one key per (batch, head) from split(key, B·H)),
    as a list over steps of (B, H, |S_t|) arrays: chunk t has the same size in every head."""
    keys = jax.random.split(key, B * H)
    chunks = [[sgd_chunks(keys[b * H + h], N, T) for h in range(H)] for b in range(B)]
    sets = []
    for t in range(T):
        rows = [[np.asarray(i)[t][np.asarray(m)[t]] for i, m in row] for row in chunks]
        sets.append(np.array(rows))  # (B, H, |S_t|)
    return sets


# ----------------------------------------------------------------------------- E1


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_e1_one_gd_step_is_noncausal_linear_attention(x64, dtype):
    """f(u) = u W, W0 = 0, T = 1, loss (1/2n)Σ‖f(k_i) − v_i‖², η = 1 ⇒ z_j = Σ (k_i·q_j) v_i / n."""
    q, k, v = _arrays(dtype)
    W0 = {"W1": jnp.zeros((H, DH, DH), dtype)}
    run = jax.jit(lambda W0, lrs: mttt(LINEAR, W0, q, k, v, lrs, loss_norm=1.0))
    z, _, losses = run(W0, jnp.ones((1,), dtype))
    expected = (
        np.einsum("bhid,bhjd,bhiv->bhjv", *(np.asarray(x, np.float64) for x in (k, q, v))) / N
    )
    tol = 1e-10 if dtype == "float64" else 1e-5
    err = assert_close(z, expected, tol, f"E1 vs einsum ({dtype})")
    la = linear_attention(q, k, v, causal=False, normalize="constant")
    assert_close(z, la, tol, "E1 vs linear_attention(causal=False, normalize='constant')")
    print(f"E1 {dtype}: rel err {err:.2e}")
    assert losses.shape == (B, H, 2)
    # Negative controls: a second step, or a non-zero W0, is no longer linear attention.
    z2, _, _ = run(W0, jnp.ones((2,), dtype))
    assert rel_err(z2, expected) > 1e-2
    z3, _, _ = run(_W0(LINEAR, dtype), jnp.ones((1,), dtype))
    assert rel_err(z3, expected) > 1e-2


# ----------------------------------------------------------------------------- loop behaviour


def test_zero_steps_is_the_initial_learner(x64):
    q, k, v = _arrays("float64")
    W0 = _W0(MLP, "float64")
    z, W_T, losses = mttt(MLP, W0, q, k, v, jnp.zeros((0,)), mode="sgd")
    expected_z = jax.vmap(jax.vmap(MLP.apply, in_axes=(0, 0, None)), in_axes=(None, 0, None))(
        W0, q, None
    )  # (B, H, N, dh)
    assert_close(z, expected_z, 1e-12, "T = 0: z = f(q; W0)")
    assert losses.shape == (B, H, 1)
    f_k = jax.vmap(jax.vmap(MLP.apply, in_axes=(0, 0, None)), in_axes=(None, 0, None))(W0, k, None)
    expected_loss = 0.5 * np.sum((np.asarray(f_k) - np.asarray(v)) ** 2, -1).mean(-1)  # (B, H)
    assert_close(losses[..., 0], expected_loss, 1e-12, "T = 0 loss at W0")
    for leaf, leaf0 in zip(
        jax.tree_util.tree_leaves(W_T), jax.tree_util.tree_leaves(W0), strict=True
    ):
        assert leaf.shape == (B, *leaf0.shape)
        assert_close(leaf, jnp.broadcast_to(leaf0, leaf.shape), 0.0, "W_T = W0")


def test_gd_inner_loss_decreases_monotonically(x64):
    q, k, v = _arrays("float64", seed=3)
    W0 = _W0(MLP, "float64", scale=0.5)
    _, _, losses = mttt(MLP, W0, q, k, v, jnp.full((6,), 0.2))
    steps = np.diff(np.asarray(losses), axis=-1)  # (B, H, 6)
    assert np.all(steps < 0), f"inner loss went up somewhere: {np.asarray(losses)}"
    assert np.all(losses[..., -1] < 0.95 * losses[..., 0])  # and by a visible amount


@pytest.mark.parametrize("n,T", [(13, 4), (12, 3), (5, 8)])
def test_sgd_chunks_use_every_token_once(n, T):
    idx, mask = sgd_chunks(jax.random.PRNGKey(0), n, T)
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert idx.shape == mask.shape == (T, -(-n // T))
    np.testing.assert_array_equal(np.sort(idx[mask]), np.arange(n))  # each token exactly once
    sizes = mask.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n
    assert np.all(idx[~mask] == 0)
    # A permutation, not the identity, and a different one for another key.
    other, _ = sgd_chunks(jax.random.PRNGKey(1), n, T)
    if n > 4:
        assert not np.array_equal(idx[mask], np.arange(n))
        assert not np.array_equal(np.asarray(other)[mask], idx[mask])


def test_sgd_with_one_step_equals_gd(x64):
    q, k, v = _arrays("float64", seed=4)
    W0 = _W0(MLP, "float64")
    lrs = jnp.array([0.7])
    gd = mttt(MLP, W0, q, k, v, lrs, mode="gd")
    sgd = mttt(MLP, W0, q, k, v, lrs, mode="sgd", key=jax.random.PRNGKey(3))
    err = assert_close(sgd, gd, 1e-10, "sgd T = 1 vs gd T = 1")
    print(f"sgd(T=1) vs gd: rel err {err:.2e}")


def test_per_sequence_W0(x64):
    """W0 with leading (B, H) equals the shared H-leading W0 broadcast over the batch."""
    q, k, v = _arrays("float64", seed=5)
    W0 = _W0(MLP, "float64")
    lrs = jnp.array([0.5, 0.5])
    shared = mttt(MLP, W0, q, k, v, lrs)
    W0_b = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (B, *x.shape)), W0)
    assert_close(mttt(MLP, W0_b, q, k, v, lrs), shared, 1e-12, "W0 (B, H) broadcast vs (H,)")
    W0_b = jax.tree_util.tree_map(lambda x: x.at[1].multiply(2.0), W0_b)
    z, _, _ = mttt(MLP, W0_b, q, k, v, lrs)
    assert_close(z[0], shared[0][0], 1e-12, "sequence 0 keeps its state")
    assert rel_err(z[1], shared[0][1]) > 1e-3


# ----------------------------------------------------------------------------- vs naive loop

NAIVE_CASES = {"gd-mlp": ("gd", MLP), "sgd-mlp": ("sgd", MLP), "gd-tiny": ("gd", TINY)}


@pytest.mark.parametrize("case", list(NAIVE_CASES))
def test_scan_matches_naive_loop(x64, case):
    """T = 3 steps, MTTT decoder r = LN(y G + g), loss_norm = dh, target width C != dh."""
    mode, learner = NAIVE_CASES[case]
    q, k, v = _arrays("float64", seed=6, d_v=C)
    W0 = _W0(learner, "float64")
    decode, dparams = _decoder("float64")
    lrs = jnp.array([0.9, 0.6, 0.3])
    key = jax.random.PRNGKey(7) if mode == "sgd" else None
    out = mttt(
        learner, W0, q, k, v, lrs, decode=decode, decode_params=dparams, mode=mode, key=key,
        loss_norm=float(DH),
    )  # fmt: skip
    sets = _sgd_sets(key, 3) if mode == "sgd" else None
    naive = jax.jit(
        lambda W0, q, k, v, lrs, dp: _naive_mttt(
            learner, W0, q, k, v, lrs, decode=decode, dparams=dp, loss_norm=float(DH), sets=sets
        )
    )(W0, q, k, v, lrs, dparams)
    err = assert_close(out, naive, 1e-10, f"mttt scan vs naive loop ({case})")
    print(f"naive loop {case}: rel err {err:.2e}")
    assert rel_err(out[2][..., 0], out[2][..., -1]) > 1e-3  # the steps did something


@pytest.mark.slow
def test_gradients_match_naive_loop(x64):
    """d/d(q, k, v, W0, lrs, decode params) of Σ sin(z) + Σ losses: scan vs naive loop."""
    q, k, v = _arrays("float64", seed=8, d_v=C)
    W0 = _W0(MLP, "float64")
    decode, dparams = _decoder("float64")
    lrs = jnp.array([0.9, 0.6, 0.3])
    kw = dict(decode=decode, loss_norm=float(DH))

    def objective(fn):
        def f(q, k, v, W0, lrs, dp):
            z, _, losses = fn(MLP, W0, q, k, v, lrs, decode_params=dp, **kw)
            return jnp.sum(jnp.sin(z)) + jnp.sum(losses)

        return jax.grad(f, argnums=tuple(range(6)))

    rename = lambda learner, W0, q, k, v, lrs, decode_params, **kw: _naive_mttt(
        learner, W0, q, k, v, lrs, dparams=decode_params, **kw
    )
    both = jax.jit(lambda *a: (objective(mttt)(*a), objective(rename)(*a)))
    g_scan, g_naive = both(q, k, v, W0, lrs, dparams)
    names = ("q", "k", "v", "W0", "lrs", "decode_params")
    for name, gs, gn in zip(names, g_scan, g_naive, strict=True):
        err = assert_close(gs, gn, 1e-10, f"grad wrt {name}")
        print(f"grad {name}: rel err {err:.2e}")
        assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree_util.tree_leaves(gs))


@pytest.mark.slow
def test_float32_matches_float64_naive(x64):
    q, k, v = _arrays("float32", seed=9, d_v=C)
    W0 = _W0(MLP, "float32")
    decode, dparams = _decoder("float32")
    lrs = jnp.array([0.9, 0.6, 0.3], jnp.float32)
    z, W_T, losses = jax.jit(
        lambda *a: mttt(MLP, *a, decode=decode, decode_params=dparams, loss_norm=float(DH))
    )(W0, q, k, v, lrs)
    assert z.dtype == losses.dtype == jnp.float32
    to64 = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), t)
    naive = jax.jit(
        lambda *a: _naive_mttt(MLP, *a, decode=decode, dparams=to64(dparams), loss_norm=float(DH))
    )(*to64((W0, q, k, v, lrs)))
    err = assert_close((z, W_T, losses), naive, 1e-5, "float32 scan vs float64 naive")
    print(f"float32 vs float64 naive: rel err {err:.2e}")


def test_jit_grad_matches_finite_differences(x64):
    """jax.grad through the scan w.r.t. q, k, v, W0, lrs and decode params, checked by a central
    difference along one random direction (the naive-loop gradient test is marked slow)."""
    q, k, v = _arrays("float64", seed=10, d_v=C)
    W0 = _W0(MLP, "float64")
    decode, dparams = _decoder("float64")
    lrs = jnp.array([0.9, 0.6, 0.3])

    def f(args):
        q, k, v, W0, lrs, dp = args
        z, _, losses = mttt(MLP, W0, q, k, v, lrs, decode=decode, decode_params=dp, loss_norm=4.0)
        return jnp.sum(jnp.sin(z)) + jnp.sum(losses)

    args = (q, k, v, W0, lrs, dparams)
    value, grads = jax.jit(jax.value_and_grad(f))(args)
    leaves, tree = jax.tree_util.tree_flatten(args)
    rng = np.random.default_rng(0)
    direction = tree.unflatten([jnp.asarray(rng.standard_normal(x.shape)) for x in leaves])
    eps = 1e-6  # truncation error ~ eps²: 1.5e-5 relative at 1e-5, 1.5e-7 at 1e-6 (float64)
    shifted = lambda s: jax.tree_util.tree_map(lambda a, d: a + s * eps * d, args, direction)
    f_jit = jax.jit(f)
    fd = (f_jit(shifted(1.0)) - f_jit(shifted(-1.0))) / (2 * eps)
    pairs = zip(*map(jax.tree_util.tree_leaves, (grads, direction)), strict=True)
    dot = sum(jnp.vdot(g, d) for g, d in pairs)
    assert abs(float(dot - fd)) <= 1e-6 * abs(float(fd)), (float(dot), float(fd))
    print(f"directional grad vs central difference: rel err {abs(float(dot - fd) / fd):.2e}")
    for name, g in zip(("q", "k", "v", "W0", "lrs", "decode_params"), grads, strict=True):
        leaves_g = jax.tree_util.tree_leaves(g)
        ok = all(bool(jnp.all(jnp.isfinite(x))) and float(jnp.abs(x).max()) > 0 for x in leaves_g)
        assert ok, f"grad wrt {name} is zero or not finite"


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_raise():
    q, k, v = _arrays("float32")
    W0 = _W0(LINEAR, "float32")
    lrs = jnp.ones((2,), jnp.float32)
    with pytest.raises(ValueError, match=r"k: expected shape \(B, H, N, d_in\) = \(2, 2, 10, 4\)"):
        mttt(LINEAR, W0, q, k[:, :, :-1], v, lrs)
    with pytest.raises(ValueError, match=r"v: expected \(B, H, N, d_v\) with d_v = 4"):
        mttt(LINEAR, W0, q, k, jnp.concatenate([v, v], -1), lrs)
    with pytest.raises(ValueError, match=r"lrs: expected a rank-1 array \(T,\)"):
        mttt(LINEAR, W0, q, k, v, lrs[None])
    with pytest.raises(ValueError, match="mode: unknown 'adam'; known: gd, sgd"):
        mttt(LINEAR, W0, q, k, v, lrs, mode="adam")
    with pytest.raises(ValueError, match="key: a PRNG key is required"):
        mttt(LINEAR, W0, q, k, v, lrs, mode="sgd")
    with pytest.raises(ValueError, match=r"W0\['W1'\]: expected shape \(H, \.\.\.\) = \(2, 4, 4\)"):
        mttt(LINEAR, {"W1": W0["W1"][:1]}, q, k, v, lrs)
    with pytest.raises(ValueError, match=r"decode_params\['G'\]: expected leading axes \(H,\)"):
        decode, dparams = _decoder("float32")
        dparams["G"] = dparams["G"][:1]
        mttt(LINEAR, W0, q, k, v, lrs, decode=decode, decode_params=dparams)
    with pytest.raises(ValueError, match="share one dtype"):
        mttt(LINEAR, W0, q, k, v.astype(jnp.float16), lrs)
    with pytest.raises(ValueError, match="T: expected at least one chunk"):
        sgd_chunks(jax.random.PRNGKey(0), 5, 0)
