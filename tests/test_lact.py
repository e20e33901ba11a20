"""LaCT (docs/design.md §14.4–14.5): SwiGLU's closed-form weighted gradient, the chunked op against
its token-loop reference (outputs, final state, every gradient; causal and not), the non-causal
one-chunk case == MTTT with T = 1, "apply, then update" causality, decode == forward, and the
layer (decode == forward, fixed-size cache, registry sizes)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.layers import make_mixer, state_size
from ttt.ops import inner_opt, lact
from ttt.ops import learners as L
from ttt.ops.mttt import mttt

B, H, D = 2, 2, 4
SW = L.swiglu(hidden_factor=1.5)


def _case(n, seed=0, per_leaf=True, momentum=True, dtype=jnp.float64):
    """(W0, q, k, v, lr, momentum) with η of LaCT's size scaled up so updates matter."""
    rng = np.random.default_rng(seed)
    W0 = jax.tree_util.tree_map(
        lambda w: jnp.asarray(0.6 * rng.normal(size=(H, *w.shape)), dtype),
        SW.init(jax.random.PRNGKey(seed), D))
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, n, D)), dtype) for _ in range(3))
    draw = lambda: jnp.asarray(rng.uniform(0.05, 0.3, size=(B, H, n)), dtype)
    lr = {name: draw() for name in W0} if per_leaf else draw()
    beta = jnp.asarray(rng.uniform(0.2, 0.9, size=(B, H, n)), dtype) if momentum else None
    return W0, q, k, v, lr, beta


def _probe(tree, seed=1):
    rng = np.random.default_rng(seed)
    return sum(jnp.sum(x * jnp.asarray(rng.normal(size=x.shape), x.dtype))
               for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- the learner


@pytest.mark.parametrize("loss", ["mse", "dot"])
def test_swiglu_closed_form_gradient_matches_autodiff(x64, loss):
    W0, q, k, v, lr, _ = _case(7)
    W = jax.tree_util.tree_map(lambda w: w[0], W0)
    plain = L.Learner("swiglu_autodiff", SW.init, SW.apply)  # no closed form: jax.vjp
    for rates in ({n: x[0, 0] for n, x in lr.items()}, lr["W1"][0, 0]):
        got = L.weighted_grads(SW, W, None, k[0, 0], v[0, 0], rates, loss)
        want = L.weighted_grads(plain, W, None, k[0, 0], v[0, 0], rates, loss)
        assert_close(got, want, 1e-12, f"swiglu {loss}")
    # and the definition, one token at a time
    per = lambda j: jax.grad(lambda W_: L.inner_loss(SW, W_, None, k[0, 0, j], v[0, 0, j], loss))(W)
    want = jax.tree_util.tree_map(lambda *g: sum(lr["W1"][0, 0, j] * g[j] for j in range(7)),
                                  *[per(j) for j in range(7)])
    assert_close(L.weighted_grads(SW, W, None, k[0, 0], v[0, 0], lr["W1"][0, 0], loss), want,
                 1e-12, "weighted sum of per-token gradients")


# ----------------------------------------------------------------------------- the op


CASES = [  # (inner optimizer, learned momentum, weight norm, per-leaf η, loss)
    ("muon", True, True, True, "dot"),
    ("sgd", False, False, False, "mse"),
    pytest.param("adam", False, True, True, "dot", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opt,mom,wn,per_leaf,loss", CASES)
def test_lact_equals_the_token_loop(x64, causal, opt, mom, wn, per_leaf, loss):
    """Forward, final state and the gradients w.r.t. W0, q, k, v, η and β; N = 11 with chunks of
    4 (a partial last chunk)."""
    n, chunk = 11, 4
    W0, q, k, v, lr, beta = _case(n, seed=3, per_leaf=per_leaf, momentum=mom)
    tx = inner_opt.make(opt, beta=None if mom else 0.8)

    def run(fn, W0, q, k, v, lr, beta):
        norms = lact.unit_norms(W0) if wn else None
        out = fn(SW, tx, W0, q, k, v, lr, chunk=chunk, loss=loss, momentum=beta,
                 weight_norm_to=norms, causal=causal)
        return (out[0], out[1].W, out[1].opt) if fn is lact.lact else out

    args = (W0, q, k, v, lr, beta)
    got, want = run(lact.lact, *args), run(lact.naive, *args)
    assert_close(got, want, 1e-10, f"{opt} causal={causal} forward")
    assert rel_err(got[0], SW.apply(jax.tree_util.tree_map(lambda w: w[None], W0), q)) > 1e-2
    argnums = (0, 1, 2, 3, 4, 5) if mom else (0, 1, 2, 3, 4)
    grads = [jax.grad(lambda *xs, fn=fn: _probe(run(fn, *xs)[:2]), argnums=argnums)(*args)
             for fn in (lact.lact, lact.naive)]
    assert_close(grads[0], grads[1], 1e-10, f"{opt} causal={causal} gradients")


def test_noncausal_one_chunk_one_sgd_step_is_mttt_T1(x64):
    """One chunk of N, plain SGD with λ_j = η / (N · loss_norm): W_1 = W0 − η ∇L(W0), then every
    query reads W_1 — MTTT with T = 1, full batch, the same learner and loss."""
    n, eta, norm = 9, 0.7, 4.0
    W0, q, k, v, _, _ = _case(n, seed=5, momentum=False)
    for loss in ("mse", "dot"):
        lr = jnp.full((B, H, n), eta / (n * norm))
        z, state = lact.lact(SW, inner_opt.make("sgd"), W0, q, k, v, lr, chunk=n, loss=loss,
                             causal=False)
        z_m, W_m, _ = mttt(SW, W0, q, k, v, jnp.asarray([eta]), loss_norm=norm, loss=loss)
        assert_close((z, state.W), (z_m, W_m), 1e-12, f"non-causal LaCT == MTTT T=1 ({loss})")
    # a chunk of n − 1 takes two steps: no longer one MTTT step
    z2, _ = lact.lact(SW, inner_opt.make("sgd"), W0, q, k, v, lr, chunk=n - 1, loss="dot",
                      causal=False)
    assert rel_err(z2, z) > 1e-6


def test_causal_first_chunk_reads_the_initial_weights_only(x64):
    n, chunk = 10, 4
    W0, q, k, v, lr, beta = _case(n, seed=6)
    tx = inner_opt.make("muon", beta=None)
    run = lambda k, v: lact.lact(SW, tx, W0, q, k, v, lr, chunk=chunk, momentum=beta)[0]
    z = run(k, v)
    W_bh = jax.tree_util.tree_map(lambda w: w[None], W0)
    assert_close(z[:, :, :chunk], SW.apply(W_bh, q[:, :, :chunk]), 1e-14, "chunk 0 = f(q; W0)")
    k2 = k.at[:, :, 1].add(1.0)  # a key of chunk 0 changes ...
    z2 = run(k2, v)
    assert_close(z2[:, :, :chunk], z[:, :, :chunk], 1e-14, "chunk 0 does not see itself")
    assert rel_err(z2[:, :, chunk:2 * chunk], z[:, :, chunk:2 * chunk]) > 1e-4  # ... chunk 1 does
    v3 = v.at[:, :, 2 * chunk].add(1.0)  # a value of the open last chunk changes nothing answered
    assert_close(run(k, v3), z, 1e-14, "the open chunk answers from the weights before it")



def test_a_step_that_keeps_no_state_skips_the_last_update():
    """Causal, the last chunk's update feeds only the state: a jitted forward+backward of the
    output alone compiles without it (as many FLOPs with Muon as with SGD at N = chunk), while
    an open chunk after it reads it (Muon then costs more), and the state still holds it."""
    chunk = 8
    W0, q, k, v, lr, beta = _case(chunk + 3, seed=8, dtype=jnp.float32)
    first = lambda x, N: jax.tree_util.tree_map(lambda y: y[:, :, :N], x)

    def cost(opt, N):
        tx = inner_opt.make(opt, beta=None) if opt == "muon" else inner_opt.make(opt)
        mom = first(beta, N) if opt == "muon" else None
        out = lambda W0, q, k, v: jnp.sum(lact.lact(SW, tx, W0, q, k, v, first(lr, N),
                                                    chunk=chunk, momentum=mom)[0] ** 2)
        args = (W0, *(first(x, N) for x in (q, k, v)))
        analysis = jax.jit(jax.value_and_grad(out, argnums=(0, 1, 2, 3))).lower(
            *args).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    assert cost("muon", chunk) == pytest.approx(cost("sgd", chunk), rel=1e-3)
    assert cost("muon", chunk + 3) > 1.2 * cost("sgd", chunk + 3)
    _, state = lact.lact(SW, inner_opt.make("sgd"), W0, *(first(x, chunk) for x in (q, k, v)),
                         first(lr, chunk), chunk=chunk)
    W0_bh = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
    leaves = jax.tree_util.tree_leaves
    assert min(rel_err(a, b) for a, b in zip(leaves(state.W), leaves(W0_bh), strict=True)) > 1e-3


def test_lact_decode_equals_forward(x64):
    n, chunk = 11, 4
    W0, q, k, v, lr, beta = _case(n, seed=7)
    tx = inner_opt.make("muon", beta=None)
    norms = lact.unit_norms(W0)
    kw = dict(chunk=chunk, weight_norm_to=norms)
    z, final = lact.lact(SW, tx, W0, q, k, v, lr, momentum=beta, **kw)
    step = jax.jit(lambda state, *xs: lact.step(SW, tx, state, *xs[:4], momentum_t=xs[4], **kw))
    for n1 in (0, 6):
        cut = lambda x: x[:, :, :n1]
        if n1:
            z1, state = lact.lact(SW, tx, W0, cut(q), cut(k), cut(v),
                                  jax.tree_util.tree_map(cut, lr), momentum=cut(beta), **kw)
            zs = [z1]
        else:
            state, zs = lact.init_state(tx, W0, B), []
        for t in range(n1, n):
            at = lambda x, t=t: x[:, :, t]
            z_t, state = step(state, at(q), at(k), at(v), jax.tree_util.tree_map(at, lr),
                              at(beta))
            zs.append(z_t[:, :, None])
        assert_close(jnp.concatenate(zs, axis=2), z, 1e-10, f"prefill({n1}) + steps")
        assert_close(state, final, 1e-10, f"state after prefill({n1}) + steps")
    with pytest.raises(ValueError, match="lr"):
        lact.lact(SW, tx, W0, q, k, v, {"W1": lr["W1"]}, momentum=beta, **kw)
    with pytest.raises(ValueError, match="chunk"):
        lact.lact(SW, tx, W0, q, k, v, lr, momentum=beta, chunk=0)


# ----------------------------------------------------------------------------- the layer

KW = dict(fw_heads=2, chunk=4, window=3, attn_block=2, base_lr=0.3, dtype=jnp.float64,
          param_dtype=jnp.float64)


def test_layer_decode_equals_forward_and_the_cache_has_a_fixed_size(x64):
    layer = make_mixer("lact", 16, 2, **KW)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 16)))
    p = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    call = jax.jit(lambda p, x: layer.apply(p, x)[0])
    step = jax.jit(lambda p, x_t, c: layer.apply(p, x_t, c, method="step"))
    y = call(p, x)
    empty = layer.apply(p, 2, method="init_cache")
    shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
    for n1 in (0, 6):
        cache, ys = empty, []
        if n1:
            y1, _, cache = layer.apply(p, x[:, :n1], method="prefill")
            assert shapes(cache) == shapes(empty)
            ys = [y1]
        for t in range(n1, 11):
            y_t, cache = step(p, x[:, t:t + 1], cache)
            ys.append(y_t)
        assert_close(jnp.concatenate(ys, axis=1), y, 1e-10, f"layer prefill({n1}) + steps")
    # causality, and the last token matters (negative control)
    x2 = x.at[:, -1].add(1.0)
    y2 = call(p, x2)
    assert_close(y2[:, :-1], y[:, :-1], 1e-12, "causality")
    assert rel_err(y2[:, -1], y[:, -1]) > 1e-3
    # the fast weights answer: other initial fast weights, other outputs
    p2 = jax.tree_util.tree_map(lambda a: a, p)
    p2["params"]["fw"]["W2"] = -p["params"]["fw"]["W2"]
    assert rel_err(call(p2, x), y) > 1e-3
    # registry state size: fast weights + optimizer state + the window's KV cache
    floats = sum(math.prod(a.shape[1:]) for key, a in
                 jax.tree_util.tree_leaves_with_path({k: empty[k] for k in ("W", "opt", "k", "v")})
                 if a.dtype == jnp.float64)
    assert state_size("lact", 16, 2, 11, fw_heads=2, chunk=4, window=3) == floats
    with pytest.raises(ValueError, match="unknown 'lion'"):
        make_mixer("lact", 16, 2, inner_opt="lion")


def test_noncausal_layer_sees_the_future_and_has_no_decode():
    layer = make_mixer("lact_noncausal", 16, 2, fw_heads=2, chunk=4, window=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 16)), jnp.float32)
    p = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    call = jax.jit(lambda p, x: layer.apply(p, x)[0])
    y, y2 = call(p, x), call(p, x.at[:, -1].add(1.0))
    assert rel_err(y2[:, 0], y[:, 0]) > 1e-5  # the last token updates the weights every query reads
    with pytest.raises(ValueError, match="non-causal"):
        layer.apply(p, 2, method="init_cache")


# ----------------------------------------------------------------------------- configs and bench


def test_lm_presets_keep_lact_proportions_and_the_bench_rows_run():
    from experiments import bench, bench_report, lm
    from ttt.config import validate
    from ttt.models import build_model, param_count

    for preset, ctx, chunk in (("125m", "2k", 512), ("350m", "8k", 2048), ("1.3b", "32k", 2048)):
        config = lm.get_config(f"lact,{preset},ctx={ctx},paper,opt=momentum")
        assert dict(config.model.mixer_kwargs) == {"chunk": chunk, "window": chunk,
                                                   "inner_opt": "momentum"}
        validate(config, num_devices=8, process_count=1)
    config = lm.get_config("lact,125m")
    with config.unlocked():
        config.model.vocab_size = 32000
    model = build_model(config.model)
    ids = jnp.zeros((1, 8), jnp.int32)
    count = param_count(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids))
    assert 0.9e8 < count < 1.9e8, count  # a 125M-class model: 12 layers of 768, vocabulary 32k
    assert lm.get_config("lact,cpu").model.mixer_kwargs.chunk == 32
    with pytest.raises(ValueError, match="no inner optimizer"):
        lm.get_config("softmax,opt=muon")
    row = bench.measure_layer("lact", 32, 1, width=32, heads=2)
    assert row["fb_s"] > 0 and row["fwd_peak_bytes"] > 0
    assert bench.measure_decode("lact", 64, 1, width=32, heads=2)["step_s"] > 0
    cpu_run = {"layers": [], "machine": {"backend": "cpu"}}
    names = [t["target"] for t in bench_report.targets(cpu_run)]
    assert any(n.startswith("lact (chunk 2048)") for n in names)
