"""Sequence mixers: TTT forward against an independent recomputation, the linear-attention rung,
decode == full forward for every causal mixer, causality, and the switches.

Parameters are random (not the init values) so that biases, token offsets and LN parameters are
all exercised; sizes are tiny (C 16, H 2, N ≤ 12) and every function is jitted once per shape.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.layers import CausalConv, LinearAttention, TTTMixer, make_mixer
from ttt.layers.ttt_layer import GPU_UNROLL, default_unroll

C, H = 16, 2
D = C // H


def random_params(module, x, seed=0):
    """Random parameters in the module's tree: kernels N(0, 1/fan_in), scales 1 + N(0, 0.1²)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        shape, dtype = leaf.shape, leaf.dtype
        if "scale" in name:
            val = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "conv" in name and "kernel" in name:
            val = 0.5 * rng.standard_normal(shape)
        elif len(shape) >= 2 and shape[-2] > 1:
            val = rng.standard_normal(shape) / np.sqrt(shape[-2])
        else:
            val = 0.1 * rng.standard_normal(shape)
        out.append(jnp.asarray(val, dtype))
    return jax.tree_util.tree_unflatten(tree, out)


def jit(f):
    """jax.jit compiled without backend optimisation: the tests are compile-bound, not run-bound."""
    jitted, compiled = jax.jit(f), {}

    def call(*args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tree, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
        if key not in compiled:
            lowered = jitted.lower(*args)
            compiled[key] = lowered.compile({"xla_backend_optimization_level": 0})
        return compiled[key](*args)

    return call


def inputs(B, N, dtype, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, N, C)), dtype)


# ------------------------------------------------------------------------- independent reference


def _ln(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    sigma = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
    return (x - mu) / sigma * scale + bias, (x - mu) / sigma, sigma


def _ln_backward(dy, xhat, sigma, scale):
    """d loss / d x of y = LN(x) given d loss / d y (row vectors)."""
    dxhat = dy * scale
    return (
        dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True)
    ) / sigma


def _rope_complex(x, pos, theta=10000.0):
    """RoPE as complex rotation of interleaved pairs: x (N, d), pos (N,)."""
    d = x.shape[-1]
    z = x[:, 0::2] + 1j * x[:, 1::2]
    freqs = theta ** (-np.arange(0, d, 2) / d)
    z = z * np.exp(1j * pos[:, None] * freqs[None, :])
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


def reference_ttt_linear(p, x, b, base_lr, backbone):
    """docs/design.md §8 written out token by token in numpy for TTT-Linear (LN residual, η).

    Returns (y (B, N, C), {"init", "before", "after"} mean squared reconstruction errors).
    """
    x = np.asarray(x, np.float64)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
    B, N, _ = x.shape
    if backbone == "transformer":
        XQ, XK = x @ p["wq"]["kernel"], x @ p["wk"]["kernel"]
    else:
        xqk = x @ p["wq"]["kernel"]
        pad = np.concatenate([np.zeros((B, 3, C)), xqk], axis=1)

        def conv(cp):
            return sum(pad[:, w : w + N] * cp["kernel"][w, 0] for w in range(4)) + cp["bias"]

        XQ, XK = conv(p["conv_q"]), conv(p["conv_k"])
    XV = x @ p["wv"]["kernel"]
    pos = np.arange(N) % b
    gate_k, gate_c = p["learnable_ttt_lr"]["kernel"][:, :, 0], p["learnable_ttt_lr"]["bias"][:, 0]
    offset = p["learnable_token_idx"]
    W0, b0 = p["ttt_dense_0"], p["ttt_bias_0"]
    gamma, beta = p["ttt_norm"]["scale"], p["ttt_norm"]["bias"]
    Z = np.zeros((B, N, C))
    errs = {"init": [], "before": [], "after": []}
    for bi in range(B):
        for h in range(H):
            sl = slice(h * D, (h + 1) * D)
            q = _rope_complex(XQ[bi, :, sl], pos)
            k = _rope_complex(XK[bi, :, sl], pos)
            v = XV[bi, :, sl]
            a = 1.0 / (1.0 + np.exp(-(x[bi] @ gate_k[h] + gate_c[h])))  # (N,)
            f = lambda W, bb, u: u + _ln(u @ W + bb, gamma[h], beta[h])[0]
            W, bb = W0[h].copy(), b0[h].copy()
            for start in range(0, N, b):
                toks = range(start, min(start + b, N))
                grads = []
                for j in toks:  # every gradient at the mini-batch's starting state
                    y, xhat, sigma = _ln(k[j] @ W + bb, gamma[h], beta[h])
                    dZ = _ln_backward(y - (v[j] - k[j]), xhat, sigma, gamma[h])
                    grads.append((np.outer(k[j], dZ), dZ))
                for j in toks:
                    errs["init"].append(np.mean((f(W0[h], b0[h], k[j]) - v[j]) ** 2))
                    errs["before"].append(np.mean((f(W, bb, k[j]) - v[j]) ** 2))
                for i in toks:
                    Wi, bi_ = W.copy(), bb.copy()
                    for j in range(start, i + 1):
                        eta = base_lr * max(1 / (i - start + 1) + offset[i - start], 0) * a[j] / D
                        Wi -= eta * grads[j - start][0]
                        bi_ -= eta * grads[j - start][1]
                    Z[bi, i, sl] = f(Wi, bi_, q[i])
                    errs["after"].append(np.mean((f(Wi, bi_, k[i]) - v[i]) ** 2))
                W, bb = Wi, bi_  # the last token's state carries
    out = _ln(Z, p["post_norm"]["scale"], p["post_norm"]["bias"])[0]
    if backbone == "mamba":
        g = x @ p["wg"]["kernel"]
        out = out * 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    return out @ p["wo"]["kernel"], {k: np.mean(v) for k, v in errs.items()}


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_ttt_linear_forward_matches_token_loop(x64, backbone):
    m = TTTMixer(
        C,
        H,
        backbone=backbone,
        mini_batch=4,
        base_lr=1.0,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
    )
    x = inputs(2, 10, jnp.float64)  # 2 full mini-batches + 2 tokens
    p = random_params(m, x)
    fwd = jit(lambda p, x, mult: m.apply(p, x, ttt_lr_mult=mult))
    y, aux = fwd(p, x, 1.0)
    y_ref, errs = reference_ttt_linear(p["params"], x, 4, 1.0, backbone)
    assert_close(y, y_ref, 1e-10, f"TTT-Linear ({backbone}) vs token loop")
    for name in ("init", "before", "after"):
        assert_close(aux[f"inner_loss_{name}"], errs[name], 1e-10, f"aux inner_loss_{name}")
    # negative control: the inner loop does something (η = 0 gives another answer)
    y0, _ = fwd(p, x, 0.0)
    assert rel_err(y0, y_ref) > 1e-3


def test_linear_attention_rung(x64):
    """Batch GD over the whole sequence, fixed η = 1, W0 = 0, no LN/residual/RoPE/post-norm
    equals (unnormalised causal) linear attention with the same projections (TTT-LM Theorem 1)."""
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64, stats=False)
    ttt = TTTMixer(
        C,
        H,
        mini_batch=0,
        learn_eta=False,
        eta=1.0,
        learn_W0=False,
        ln_residual=False,
        rope=False,
        post_norm=False,
        **kw,
    )
    lin = LinearAttention(C, H, dtype=jnp.float64, param_dtype=jnp.float64)
    x = inputs(2, 11, jnp.float64)
    p = random_params(ttt, x)
    assert set(p["params"]) == {"wq", "wk", "wv", "wo"}
    y_ttt, _ = jit(ttt.apply)(p, x)
    y_lin, _ = jit(lin.apply)(p, x)  # same tree: the kernels are copied as they are
    assert_close(y_ttt, y_lin, 1e-10, "TTT rung vs linear attention")
    # negative control: mini-batches of 4 (the next rung) differ
    y_mb, _ = jit(
        TTTMixer(
            C,
            H,
            mini_batch=4,
            learn_eta=False,
            eta=1.0,
            learn_W0=False,
            ln_residual=False,
            rope=False,
            post_norm=False,
            **kw,
        ).apply
    )(p, x)
    assert rel_err(y_mb, y_lin) > 1e-3


# ----------------------------------------------------------------------------- decoding

B_DEC, N_DEC, MB = 2, 12, 4
CAUSAL = {
    "ttt_linear": dict(mini_batch=MB, stats=False),
    "ttt_mlp": dict(mini_batch=MB, stats=False),
    "ttt_linear_mamba": dict(mini_batch=MB, stats=False),
    "ttt_mlp_mamba": dict(mini_batch=MB, stats=False),
    "linear_attention": dict(normalize="adaptive", feature_map="elu", chunk=5),
    "softmax": dict(cache_size=16),
}


def _decode_check(name, dtype, rtol, prefixes):
    """prefill(N1) + single steps == __call__ on all N tokens, for each N1 in `prefixes`; also
    decoding from init_cache alone; and changing the last token leaves earlier outputs alone."""
    m = make_mixer(name, C, H, dtype=dtype, param_dtype=dtype, **CAUSAL[name])
    x = inputs(B_DEC, N_DEC, dtype)
    p = random_params(m, x)
    call = jit(lambda p, x: m.apply(p, x)[0])
    prefill = jit(lambda p, x: m.apply(p, x, method="prefill"))
    step = jit(lambda p, x, c: m.apply(p, x, c, method="step"))
    y_full = call(p, x)
    empty = m.apply(p, B_DEC, method="init_cache")
    for n1 in prefixes:
        y1, _, cache = prefill(p, x[:, :n1])
        assert jax.tree_util.tree_structure(cache) == jax.tree_util.tree_structure(empty)
        assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), cache) == (
            jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), empty)
        ), "prefill's cache must be interchangeable with init_cache's (one jitted step)"
        ys = [y1]
        for t in range(n1, N_DEC):
            y_t, cache = step(p, x[:, t : t + 1], cache)
            ys.append(y_t)
        assert_close(jnp.concatenate(ys, axis=1), y_full, rtol, f"{name} prefill({n1}) + steps")
    cache, ys = empty, []
    for t in range(N_DEC):
        y_t, cache = step(p, x[:, t : t + 1], cache)
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, axis=1), y_full, rtol, f"{name} steps from init_cache")
    # causality, and a negative control that the last token matters
    x2 = x.at[:, -1].set(x[:, 0])
    y2 = call(p, x2)
    assert_close(y2[:, :-1], y_full[:, :-1], 1e3 * rtol, f"{name} causality")
    assert rel_err(y2[:, -1], y_full[:, -1]) > 1e-3


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name",
    [
        "ttt_linear",
        "ttt_mlp_mamba",
        pytest.param("ttt_mlp", marks=SLOW),
        pytest.param("ttt_linear_mamba", marks=SLOW),
        "linear_attention",
        "softmax",
    ],
)
def test_decode_matches_forward_float64(x64, name):
    _decode_check(name, jnp.float64, 1e-9, prefixes=(8, 6))  # N1 a multiple of b, and not


@pytest.mark.parametrize(
    "name",
    [
        "ttt_linear",
        pytest.param("ttt_mlp_mamba", marks=SLOW),
        pytest.param("ttt_mlp", marks=SLOW),
        pytest.param("ttt_linear_mamba", marks=SLOW),
        pytest.param("linear_attention", marks=SLOW),
        pytest.param("softmax", marks=SLOW),
    ],
)
def test_decode_matches_forward_float32(name):
    _decode_check(name, jnp.float32, 1e-4, prefixes=(6,))


def test_ttt_cache_size_independent_of_context():
    m = make_mixer("ttt_mlp_mamba", C, H, mini_batch=MB, stats=False)
    x = inputs(1, 5, jnp.float32)
    p = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    shapes = [
        jax.eval_shape(
            lambda p, x: m.apply(p, x, method="prefill")[2], p, inputs(1, n, jnp.float32)
        )
        for n in (3, 12, 37)
    ]
    assert shapes[0] == shapes[1] == shapes[2]
    floats = sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes[0]))
    W = sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes[0]["W"]))
    assert floats == 2 * W + 1 + 3 * C  # state + gradient accumulator + position + conv tail


# ----------------------------------------------------------------------------- switches and parts


def test_switches_mini_batch_zero_form_and_remat(x64):
    """mini_batch=0 == mini_batch=N; primal form == dual form; remat_every does not change z."""
    kw = dict(learn_eta=False, dtype=jnp.float64, param_dtype=jnp.float64, stats=False)
    x = inputs(1, 7, jnp.float64)
    whole = TTTMixer(C, H, mini_batch=0, **kw)
    p = random_params(whole, x)
    y0, _ = jit(whole.apply)(p, x)
    y7, _ = jit(whole.clone(mini_batch=7, form="primal", remat_every=1).apply)(p, x)
    assert_close(y0, y7, 1e-10, "mini_batch=0 (dual) vs mini_batch=N (primal, remat)")
    y3, _ = jit(whole.clone(mini_batch=3).apply)(p, x)
    assert rel_err(y3, y0) > 1e-3  # negative control: b matters
    y3u, _ = jit(whole.clone(mini_batch=3, unroll=2).apply)(p, x)
    assert_close(y3u, y3, 1e-12, "unroll=2 vs the default")


@pytest.mark.parametrize("learner,backbone", [("linear", "transformer"), ("mlp", "transformer"),
                                              ("linear", "mamba")])
def test_grouped_remat_layer_equals_plain_layer(x64, learner, backbone):
    """remat_every > 0 runs the whole layer in checkpointed groups of mini-batches (projections,
    RoPE, η, inner loop, output per group; state and conv tail carried): outputs, inner-loss
    diagnostics and every gradient equal the ungrouped layer's. N = 37 with groups of 2·4 tokens:
    5 groups, the last padded."""
    kw = dict(learner=learner, backbone=backbone, mini_batch=4, dtype=jnp.float64,
              param_dtype=jnp.float64)
    plain = TTTMixer(C, H, **kw)
    grouped = TTTMixer(C, H, remat_every=2, **kw)
    x = inputs(2, 37, jnp.float64)
    p = random_params(plain, x)
    # the parameter tree does not depend on the grouping
    assert jax.tree_util.tree_structure(grouped.init(jax.random.PRNGKey(0), x)) == \
        jax.tree_util.tree_structure(p)
    ct = inputs(2, 37, jnp.float64, seed=7)

    def value_and_grads(module):
        def loss(p, x):
            y, aux = module.apply(p, x)
            return jnp.sum(y * ct), (y, aux)
        return jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)

    (l0, (y0, aux0)), g0 = value_and_grads(plain)
    (l1, (y1, aux1)), g1 = value_and_grads(grouped)
    assert_close(y1, y0, 1e-12, "y")
    assert_close(g1, g0, 1e-12, "grads")
    assert set(aux1) == set(aux0) and aux0
    for key in aux0:
        assert_close(aux1[key], aux0[key], 1e-12, key)
    # the state crosses group boundaries: the first token changes outputs in the last group
    y2, _ = jit(grouped.apply)(p, x.at[:, 0].add(1.0))
    assert rel_err(y2[:, 32:], y1[:, 32:]) > 1e-6


def test_unroll_default_and_checks():
    assert default_unroll("gpu") == GPU_UNROLL > 1
    assert default_unroll("cpu") == default_unroll("tpu") == 1
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="unroll: expected None or an int >= 1"):
            TTTMixer(C, H, unroll=bad)


def test_causal_conv_matches_flax_conv():
    x = inputs(2, 9, jnp.float32)
    ours = CausalConv(C, 4)
    p = random_params(ours, x)
    flax_conv = nn.Conv(C, (4,), padding="CAUSAL", feature_group_count=C)
    assert jax.tree_util.tree_map(jnp.shape, p) == jax.tree_util.tree_map(
        jnp.shape, flax_conv.init(jax.random.PRNGKey(0), x)
    )
    y, _ = jit(ours.apply)(p, x)
    assert_close(y, jit(flax_conv.apply)(p, x), 1e-6, "CausalConv vs nn.Conv(CAUSAL)")
    # in two chunks, the second given the first's tail == whole
    y1, t1 = jit(ours.apply)(p, x[:, :5])
    y2, _ = jit(ours.apply)(p, x[:, 5:], t1)
    assert_close(jnp.concatenate([y1, y2], 1), y, 1e-6, "CausalConv in two chunks")


@pytest.mark.parametrize("w", [1, 2, 4])
def test_depthwise_causal_backward_matches_autodiff(x64, w):
    """The written-out backward of the causal conv == autodiff of its defining sum, at every
    width (w = 1: no left context)."""
    from ttt.ops.primitives import causal_conv

    def depthwise_causal(xp, kernel):  # the left context is the first w - 1 rows of xp
        return causal_conv(xp[:, w - 1:], kernel, None, xp[:, :w - 1])[0]

    rng = np.random.default_rng(0)
    xp, kernel, ct = (jnp.asarray(rng.normal(size=s)) for s in ((2, w - 1 + 9, C), (w, C),
                                                                 (2, 9, C)))

    def reference(xp, kernel):
        return sum(xp[:, i : i + 9, :] * kernel[i] for i in range(w))

    loss = lambda f: jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1)))
    assert_close(jit(depthwise_causal)(xp, kernel), reference(xp, kernel), 1e-12, "conv forward")
    assert_close(loss(depthwise_causal)(xp, kernel), loss(reference)(xp, kernel), 1e-12,
                 "conv gradients")
    dk = loss(reference)(xp, kernel)[1]
    assert rel_err(loss(depthwise_causal)(xp, kernel * 2)[1], dk) < 1e-12  # dK is free of K
    assert rel_err(loss(depthwise_causal)(xp * 2, kernel)[1], dk) > 0.5  # negative control


def test_scale_features_backward_matches_autodiff(x64):
    """The per-feature scale's written-out backward (a ones-vector sum over rows) == autodiff of
    x ⊙ s, with rows over two leading axes."""
    from ttt.ops.primitives import scale_features

    rng = np.random.default_rng(1)
    x, s, ct = (jnp.asarray(rng.normal(size=shape)) for shape in ((3, 5, C), (C,), (3, 5, C)))
    loss = lambda f: jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1))
    ours, ref = loss(scale_features)(x, s), loss(lambda a, b: a * b)(x, s)
    assert_close(ours, ref, 1e-12, "d/dx, d/ds")
    assert rel_err(loss(scale_features)(x[:, ::-1], s)[1], ref[1]) > 1e-3  # negative control


@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
def test_layer_norm_matches_flax(x64, dtype, rtol):
    """common.LayerNorm (written-out backward) == flax LayerNorm: params, outputs, all gradients."""
    from ttt.layers.common import LayerNorm

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, C)) * 3 + 1, dtype)
    ours, ref = LayerNorm(epsilon=1e-6, dtype=dtype), nn.LayerNorm(epsilon=1e-6, dtype=dtype)
    p = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(0), x)) == (
        jax.tree_util.tree_map(jnp.shape, p))
    p = jax.tree_util.tree_map(  # non-trivial scale and bias
        lambda w: w + jnp.asarray(np.random.default_rng(1).normal(size=w.shape), w.dtype), p)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), dtype)
    grads = lambda m: jit(jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * ct), argnums=(0, 1)))
    assert_close(jit(ours.apply)(p, x), jit(ref.apply)(p, x), rtol, "LayerNorm forward")
    assert_close(grads(ours)(p, x), grads(ref)(p, x), rtol, "LayerNorm gradients")
    assert rel_err(grads(ours)(p, x * 1.5)[1], grads(ref)(p, x)[1]) > 1e-3  # negative control


def test_official_parameter_names():
    x = inputs(1, 4, jnp.float32)
    names = lambda m: set(jax.eval_shape(m.init, jax.random.PRNGKey(0), x)["params"])
    assert names(make_mixer("ttt_mlp_mamba", C, H)) == {
        "wq", "wv", "wo", "wg", "conv_q", "conv_k", "learnable_ttt_lr", "learnable_token_idx",
        "ttt_norm", "ttt_dense_0", "ttt_bias_0", "ttt_dense_1", "ttt_bias_1", "post_norm",
    }  # fmt: skip
    assert names(make_mixer("ttt_linear", C, H)) == {
        "wq", "wk", "wv", "wo", "learnable_ttt_lr", "learnable_token_idx", "ttt_norm",
        "ttt_dense_0", "ttt_bias_0", "post_norm",
    }  # fmt: skip
    assert names(make_mixer("mttt_mlp", C, H)) == {
        "psi", "phi", "g", "g_bias", "h", "h_bias", "inner_Dense_0", "inner_Dense_1", "decoder_LN",
    }  # fmt: skip
    assert "inner_Dense_0" not in names(make_mixer("mttt_linear", C, H))  # W0 frozen at zero


# ----------------------------------------------------------------------------- MTTT


def test_mttt_mixer_losses_steps_and_sgd():
    x = inputs(2, 9, jnp.float32)
    m = make_mixer("mttt_mlp", C, H, steps=2, lrs=(1.0, 0.5), mode="sgd")
    p = random_params(m, x)
    fwd = jit(lambda p, x, key: m.apply(p, x, train=True, rngs={"inner": key}))
    y, aux = fwd(p, x, jax.random.PRNGKey(1))
    assert y.shape == x.shape and aux["inner_losses"].shape == (3,)
    assert np.all(np.isfinite(aux["inner_losses"]))
    y_other, _ = fwd(p, x, jax.random.PRNGKey(2))
    assert rel_err(y_other, y) > 1e-6  # the permutation comes from the "inner" stream
    with pytest.raises(ValueError, match="inner"):
        m.apply(p, x, train=True)
    evaluate = jit(m.apply)  # evaluation: a fixed key, deterministic
    assert_close(evaluate(p, x)[0], evaluate(p, x)[0], 0.0, "MTTT sgd eval determinism")
    # T = 0: the inner model answers with W0 = 0 (MTTT-Linear), so the output is the bias alone
    m0 = make_mixer("mttt_linear", C, H, steps=0, inner_bias=False)
    p0 = random_params(m0, x)
    y0, aux0 = jit(m0.apply)(p0, x)
    assert aux0["inner_losses"].shape == (1,)
    assert_close(y0, jnp.broadcast_to(p0["params"]["h_bias"], x.shape), 1e-6, "MTTT T=0")


def test_mttt_linear_gd_reference_and_grad(x64):
    """MTTT-Linear (W0 = 0, T = 1, η = 1, no decoder LN) against a direct computation, and
    jit + grad through the layer."""
    kw = dict(dtype=jnp.float64, param_dtype=jnp.float64)
    m = make_mixer("mttt_linear", C, H, decoder_ln=False, inner_bias=False, **kw)
    x = inputs(2, 6, jnp.float64)
    p = random_params(m, x)
    y, aux = jit(m.apply)(p, x)
    pp = jax.tree_util.tree_map(np.asarray, p["params"])
    xs = np.asarray(x)
    out = np.zeros_like(xs) + pp["h_bias"]
    for bi in range(2):
        for h in range(H):
            kk = xs[bi] @ pp["phi"]["kernel"][h] + pp["phi"]["bias"][h]  # (N, dh)
            qq = xs[bi] @ pp["psi"]["kernel"][h] + pp["psi"]["bias"][h]
            G = pp["g"]["kernel"][h]  # (dh, C)
            # L(W) = Σ_i ‖k_i W G + g_bias − x_i‖² / (2 N dh); at W = 0 the gradient is
            # −kᵀ (x − g_bias) Gᵀ / (N dh)
            grad = -kk.T @ (xs[bi] - pp["g_bias"]) @ G.T / (6 * D)
            out[bi] += qq @ (-grad) @ pp["h"]["kernel"][h]
    assert_close(y, out, 1e-10, "MTTT-Linear vs closed form")
    assert aux["inner_losses"][1] < aux["inner_losses"][0]  # one step lowers the inner loss

    def loss(p):
        y, aux = m.apply(p, x)
        return jnp.mean(y**2) + aux["inner_losses"][-1]

    g = jax.jit(jax.grad(loss))(p)
    norms = jax.tree_util.tree_map(lambda a: float(jnp.linalg.norm(a)), g["params"])
    assert all(np.isfinite(v) and v > 0 for v in jax.tree_util.tree_leaves(norms)), norms


# ----------------------------------------------------------------------------- registry and errors


def test_registry_names_and_errors():
    for name in ("ttt_linear", "ttt_mlp", "ttt_linear_mamba", "ttt_mlp_mamba", "linear_attention",
                 "softmax", "mttt_linear", "mttt_mlp", "linear_attention_noncausal",
                 "softmax_noncausal"):  # fmt: skip
        make_mixer(name, C, H)
    assert make_mixer("ttt_mlp", C, H).base_lr == 0.1
    assert make_mixer("ttt_linear", C, H).mini_batch == 16
    with pytest.raises(ValueError, match="known mixers: ttt_linear, ttt_mlp"):
        make_mixer("ttt_lstm", C, H)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['minibatch'\].*mini_batch"):
        make_mixer("ttt_linear", C, H, minibatch=4)
    bad = [
        dict(width=18, num_heads=4),  # width % heads
        dict(width=6, num_heads=2),  # odd head dim with RoPE
        dict(mini_batch=0),  # whole sequence needs a constant η
        dict(learner="rnn"),
        dict(backbone="s4"),
        dict(learner="mlp", learn_W0=False),
        dict(mini_batch=-1),
    ]
    for kw in bad:
        args = {"width": C, "num_heads": H, **kw}
        with pytest.raises(ValueError):
            make_mixer("ttt_linear", args.pop("width"), args.pop("num_heads"), **args)
    make_mixer("ttt_linear", 6, 2, rope=False)  # odd head dim is fine without RoPE
    with pytest.raises(ValueError, match="lrs"):
        make_mixer("mttt_mlp", C, H, steps=2, lrs=(1.0,))


def test_shape_and_cache_errors():
    m = make_mixer("ttt_linear", C, H, mini_batch=4)
    x = inputs(1, 5, jnp.float32)
    p = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
    shape_of = lambda *a, **k: jax.eval_shape(lambda p: m.apply(p, *a, **k), p)
    with pytest.raises(ValueError, match=r"\(B, N, C=16\)"):
        shape_of(jnp.zeros((5, C)))
    with pytest.raises(ValueError, match=r"\(B, N, C=16\)"):
        shape_of(jnp.zeros((1, 5, C + 1)))
    cache = jax.eval_shape(lambda p: m.apply(p, 1, method="init_cache"), p)
    with pytest.raises(ValueError, match=r"\(B, 1, C\)"):
        shape_of(jnp.zeros((1, 2, C)), cache, method="step")
    with pytest.raises(ValueError, match="keys"):
        shape_of(jnp.zeros((1, 1, C)), {"W": cache["W"]}, method="step")
    with pytest.raises(ValueError, match="batch"):
        shape_of(jnp.zeros((3, 1, C)), cache, method="step")
    soft = make_mixer("softmax", C, H, cache_size=4)
    ps = jax.eval_shape(soft.init, jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="cache_size"):
        jax.eval_shape(lambda p: soft.apply(p, x, method="prefill"), ps)
    nc = make_mixer("softmax_noncausal", C, H)
    with pytest.raises(ValueError, match="non-causal"):
        nc.apply({}, 1, method="init_cache")


def test_projection_on_the_2d_view_is_the_same_product():
    """`project` / `project_dot_general` (the weight gradient as one plain matmul on XLA:CPU)
    give x @ w and its gradients; Dense keeps its parameters; other contractions fall through."""
    from ttt.layers import common
    from ttt.ops.primitives import project, project_dot_general

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, 5, 8), jnp.float32)
    w = jax.random.normal(kw, (8, 6), jnp.float32)
    np.testing.assert_allclose(project(x, w), x @ w, rtol=1e-6, atol=1e-6)
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))  # noqa: E731
    ga = jax.grad(loss(project), argnums=(0, 1))(x, w)
    gb = jax.grad(loss(lambda x, w: x @ w), argnums=(0, 1))(x, w)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    dense = common.dense(6, "wq", jnp.float32, jnp.float32)
    plain = nn.Dense(6, use_bias=False, kernel_init=nn.initializers.normal(0.02), name="wq")
    p1, p2 = dense.init(jax.random.PRNGKey(1), x), plain.init(jax.random.PRNGKey(1), x)
    assert jax.tree.structure(p1) == jax.tree.structure(p2)
    np.testing.assert_allclose(dense.apply(p1, x), plain.apply(p1, x), rtol=1e-6, atol=1e-6)
    # a contraction Dense never asks for (batch dims) goes to lax.dot_general unchanged
    dims = (((2,), (1,)), ((0,), (0,)))
    y = jax.random.normal(kw, (3, 8, 4), jnp.float32)
    np.testing.assert_allclose(project_dot_general(x, y, dims),
                               jax.lax.dot_general(x, y, dims), rtol=1e-6, atol=1e-6)


def test_softmax_step_reads_the_cache_then_writes_it(x64):
    """The decode step attends to the cached positions < pos and to the new token, then writes it:
    equal to writing first and attending to positions ≤ pos (the defining form), also when the
    cache is full (pos ≥ L: the write clamps to slot L − 1, which the new token replaces)."""
    soft = make_mixer("softmax", C, H, cache_size=4, rope=False, dtype=jnp.float64,
                      param_dtype=jnp.float64)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 4, C)))
    p = soft.init(jax.random.PRNGKey(0), x)
    cache = soft.apply(p, 2, method="init_cache")
    cache = {"k": jnp.asarray(rng.normal(size=cache["k"].shape)),
             "v": jnp.asarray(rng.normal(size=cache["v"].shape)), "pos": cache["pos"]}

    def defining(pos, x_t):  # write at min(pos, L − 1), softmax over slots ≤ pos
        q, k, v = (jnp.einsum("bc,cd->bd", x_t[:, 0], p["params"][n]["kernel"]).reshape(2, H, -1)
                   for n in ("wq", "wk", "wv"))
        K = cache["k"].at[:, :, min(pos, 3)].set(k)
        V = cache["v"].at[:, :, min(pos, 3)].set(v)
        s = jnp.einsum("bhd,bhkd->bhk", q, K) / np.sqrt(C // H)
        s = jnp.where(jnp.arange(4) <= pos, s, -jnp.inf)
        z = jnp.einsum("bhk,bhkd->bhd", jax.nn.softmax(s, -1), V).reshape(2, 1, C)
        return z @ p["params"]["wo"]["kernel"], K, V

    for pos in (0, 2, 4):
        x_t = jnp.asarray(rng.normal(size=(2, 1, C)))
        y, new = soft.apply(p, x_t, dict(cache, pos=jnp.asarray(pos, jnp.int32)), method="step")
        want, K, V = defining(pos, x_t)
        assert_close(y, want, 1e-12, f"step at pos {pos}")
        assert_close((new["k"], new["v"]), (K, V), 0.0, f"cache at pos {pos}")
