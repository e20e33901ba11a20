"""DeltaNet / Gated DeltaNet layer: the whole layer against a token-loop reference written here
from the parameters (outputs, decode state; gradients in the slow run), the chunked layer against
its recurrent twin (outputs, state, gradients), the ungated layer as the gate at a = 1,
prefill + steps == forward, chunk-size invariance, ttt_lr_mult as a scale of β, the init
conventions, the registry's state size, argument errors and negative controls."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close, rel_err

from ttt.layers import costs, forward_flops, make_mixer, state_size
from ttt.layers.delta_layer import DeltaNetMixer

B, N, C, H = 2, 11, 8, 2  # d = 4; N is not a multiple of the chunk
CHUNK = 4
F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)


def _layer(gate, expand_v=1, **kw):
    return DeltaNetMixer(C, H, gate=gate, expand_v=expand_v, init_scale=0.4,
                         **{"chunk": CHUNK, **F64, **kw})


def _setup(gate, expand_v=1, seed=0, **kw):
    """(module, params, x): float64, projections large enough that every term matters."""
    m = _layer(gate, expand_v, **kw)
    x = jax.random.normal(jax.random.key(seed), (B, N, C), jnp.float64)
    params = m.init(jax.random.key(seed + 1), method=DeltaNetMixer._params)  # no forward
    # a non-trivial output norm, so a wrong head layout of its scale would show
    scale = params["params"]["o_norm"]
    params["params"]["o_norm"] = scale + 0.3 * jax.random.normal(jax.random.key(9), scale.shape,
                                                                 scale.dtype)
    return m, params, x


def reference(params, x, H, gate, decay_after=False, mult=1.0):
    """The layer token by token, from its parameters: projections, the three causal convs (one
    loop over taps), SiLU, L2-normalised q (/ √d) and k, β, the gate, the delta rule as a Python
    loop, per-head RMSNorm, the SiLU output gate, W_o; β scaled by mult.
    Returns (y (B, N, C), S (B, H, d, d_v)).
    decay_after: the negative control, S_t = a_t (S_{t−1} + β_t k_t (v_t − S_{t−1}ᵀ k_t)ᵀ)."""
    p = params["params"]
    Bx, Nx, Cx = x.shape
    d = Cx // H
    silu = lambda z: z / (1 + jnp.exp(-z))

    def conv(z, kernel):  # z (B, N, ch), kernel (w, ch): y_t = Σ_i z_{t−w+1+i} K[i]
        w = kernel.shape[0]
        zp = jnp.concatenate([jnp.zeros((Bx, w - 1, z.shape[-1]), z.dtype), z], axis=1)
        return sum(zp[:, i:i + Nx] * kernel[i] for i in range(w))

    heads = lambda z: z.reshape(Bx, Nx, H, -1)  # (B, N, H, ·), head-major features
    q = heads(silu(conv(x @ p["wq"]["kernel"], p["conv_q"]["kernel"])))
    k = heads(silu(conv(x @ p["wk"]["kernel"], p["conv_k"]["kernel"])))
    v = heads(silu(conv(x @ p["wv"]["kernel"], p["conv_v"]["kernel"])))
    q = q / jnp.sqrt(jnp.sum(q**2, -1, keepdims=True) + 1e-6) / math.sqrt(d)
    k = k / jnp.sqrt(jnp.sum(k**2, -1, keepdims=True) + 1e-6)
    beta = mult / (1 + jnp.exp(-(x @ p["b_proj"]["kernel"])))  # (B, N, H)
    if gate:
        dt = jnp.log1p(jnp.exp(x @ p["a_proj"]["kernel"] + p["dt_bias"]))
        a = jnp.exp(-jnp.exp(p["A_log"]) * dt)  # (B, N, H)
    else:
        a = jnp.ones_like(beta)
    S = jnp.zeros((Bx, H, d, v.shape[-1]), x.dtype)
    outs = []
    for t in range(Nx):
        at, bt = a[:, t, :, None, None], beta[:, t, :, None]
        kt, vt, qt = k[:, t], v[:, t], q[:, t]  # (B, H, ·)
        if decay_after:
            err = vt - jnp.einsum("bhkv,bhk->bhv", S, kt)
            S = at * (S + jnp.einsum("bhk,bhv->bhkv", kt, bt * err))
        else:
            err = vt - jnp.einsum("bhkv,bhk->bhv", at * S, kt)
            S = at * S + jnp.einsum("bhk,bhv->bhkv", kt, bt * err)
        outs.append(jnp.einsum("bhkv,bhk->bhv", S, qt))
    o = jnp.stack(outs, axis=1)  # (B, N, H, d_v)
    o = o / jnp.sqrt(jnp.mean(o**2, -1, keepdims=True) + 1e-5) * p["o_norm"]
    o = o * silu(heads(x @ p["g_proj"]["kernel"]))
    return o.reshape(Bx, Nx, -1) @ p["wo"]["kernel"], S


reference_jit = jax.jit(reference, static_argnums=(2, 3), static_argnames="decay_after")

CASES = [(False, 1), (True, 1), (True, 2)]
IDS = ["deltanet", "gated", "gated_expand_v2"]


@pytest.mark.parametrize("gate,expand_v", CASES, ids=IDS)
def test_layer_equals_the_token_loop_reference(x64, gate, expand_v):
    m, params, x = _setup(gate, expand_v)
    y, _, cache = m.apply(params, x, method="prefill")
    y_ref, S_ref = reference_jit(params, x, H, gate)
    assert_close(y, y_ref, 1e-11, "layer vs token loop")
    assert_close(cache["S"], S_ref, 1e-11, "final state vs token loop")
    assert cache["S"].shape == (B, H, C // H, expand_v * C // H)
    # the conv tail: the last w − 1 projected inputs, q | k | v channels
    p = params["params"]
    proj = jnp.concatenate([x @ p[n]["kernel"] for n in ("wq", "wk", "wv")], axis=-1)
    assert_close(cache["conv"], proj[:, -3:], 1e-12, "conv tail")
    assert_close(m.apply(params, x)[0], y, 0.0, "__call__ == prefill's output")
    # negative control: the decay applied after the update (a different recurrence when gated)
    if gate:
        assert rel_err(reference_jit(params, x, H, gate, decay_after=True)[0], y) > 1e-3


def _grads(m, params, x, f):
    """d/d(params, x) of Σ f(params, x) ⊙ probe, jitted (one compilation)."""
    probe = jax.random.normal(jax.random.key(7), x.shape, x.dtype)
    loss = lambda p, x_: jnp.sum(f(p, x_) * probe)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("gate,expand_v", CASES, ids=IDS)
def test_chunked_layer_equals_its_recurrent_twin_with_gradients(x64, gate, expand_v):
    m, params, x = _setup(gate, expand_v, seed=3)
    slow = _layer(gate, expand_v, form="recurrent")
    y, _, cache = m.apply(params, x, method="prefill")
    y_slow, _, cache_slow = slow.apply(params, x, method="prefill")
    assert_close((y, cache), (y_slow, cache_slow), 1e-11, "chunked vs recurrent")
    got = _grads(m, params, x, lambda p, x_: m.apply(p, x_)[0])
    want = _grads(slow, params, x, lambda p, x_: slow.apply(p, x_)[0])
    assert_close(got, want, 1e-10, "d(chunked) vs d(recurrent)")


@pytest.mark.slow  # the unrolled token loop under autodiff compiles slowly
@pytest.mark.parametrize("gate,expand_v", CASES[:2], ids=IDS[:2])
def test_layer_gradients_equal_the_reference(x64, gate, expand_v):
    m, params, x = _setup(gate, expand_v, seed=3)
    got = _grads(m, params, x, lambda p, x_: m.apply(p, x_)[0])
    want = _grads(m, params, x, lambda p, x_: reference(p, x_, H, gate)[0])
    assert_close(got, want, 1e-9, "d(layer) vs d(token loop)")


def test_ungated_layer_is_the_gate_at_a_equal_1(x64):
    m, params, x = _setup(True)
    p = dict(params["params"])
    p["A_log"] = jnp.full_like(p["A_log"], -jnp.inf)  # log a = −exp(A_log)·softplus(·) = 0
    y_open = m.apply({"params": p}, x)[0]
    plain = {k: v for k, v in p.items() if k not in ("a_proj", "A_log", "dt_bias")}
    y_plain = _layer(False).apply({"params": plain}, x)[0]
    assert_close(y_open, y_plain, 1e-13, "gate=False vs gate with a = 1")
    # negative control: the trained-at-init gate decays, so the layers differ
    assert rel_err(m.apply(params, x)[0], y_plain) > 1e-3


@pytest.mark.parametrize("gate", [False, True], ids=["deltanet", "gated"])
def test_prefill_then_steps_equals_forward(x64, gate):
    m, params, x = _setup(gate, seed=5)
    y, _, full = m.apply(params, x, method="prefill")
    step = jax.jit(lambda c, x_t: m.apply(params, x_t, c, method="step"))
    for n1 in (3, 5):  # inside the first chunk; past its end, mid-chunk
        y1, _, cache = m.apply(params, x[:, :n1], method="prefill")
        ys = [y1]
        for t in range(n1, N):
            y_t, cache = step(cache, x[:, t:t + 1])
            ys.append(y_t)
        assert_close(jnp.concatenate(ys, axis=1), y, 1e-11, f"prefill({n1}) + steps")
        assert_close(cache, full, 1e-11, f"cache after prefill({n1}) + steps")
    # from an empty cache, all N as steps
    cache, ys = m.apply(params, B, method="init_cache"), []
    for t in range(N):
        y_t, cache = step(cache, x[:, t:t + 1])
        ys.append(y_t)
    assert_close(jnp.concatenate(ys, axis=1), y, 1e-11, "steps from init_cache")
    # negative control: a step that forgets the prompt (empty cache at token 5)
    wrong, _ = step(m.apply(params, B, method="init_cache"), x[:, 5:6])
    assert rel_err(wrong, y[:, 5:6]) > 1e-3


def test_chunk_size_does_not_change_the_layer(x64):
    m, params, x = _setup(True, seed=2)
    y = m.apply(params, x)[0]
    for chunk in (1, 3, 64):
        assert_close(_layer(True, chunk=chunk).apply(params, x)[0], y, 1e-11, f"chunk {chunk}")


def test_ttt_lr_mult_scales_beta(x64):
    m, params, x = _setup(True, seed=4)
    half = m.apply(params, x, ttt_lr_mult=0.5)[0]
    assert_close(half, reference_jit(params, x, H, True, mult=0.5)[0], 1e-11, "β · 0.5")
    assert rel_err(half, m.apply(params, x)[0]) > 1e-3
    # β = 0: S is never written, o = 0, and RMSNorm(0) = 0
    assert_close(m.apply(params, x, ttt_lr_mult=0.0)[0], jnp.zeros((B, N, C)), 0.0, "mult 0")


def test_init_follows_the_conventions():
    m = DeltaNetMixer(64, 8, gate=True, expand_v=2)
    p = m.init(jax.random.key(0), method=DeltaNetMixer._params)["params"]  # no forward
    A = jnp.exp(p["A_log"])
    assert p["A_log"].shape == (8,) and bool(jnp.all((A >= 1e-4) & (A <= 16)))
    dt = jax.nn.softplus(p["dt_bias"])
    assert bool(jnp.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5))))
    for name in ("conv_q", "conv_k", "conv_v"):
        kern = p[name]["kernel"]
        assert kern.shape[0] == 4 and float(jnp.max(jnp.abs(kern))) <= 0.5  # U(±1/√4)
    assert p["conv_v"]["kernel"].shape == (4, 128) and p["wo"]["kernel"].shape == (128, 64)
    assert bool(jnp.all(p["o_norm"] == 1)) and p["o_norm"].shape == (16,)
    ungated = DeltaNetMixer(64, 8).init(jax.random.key(0), method=DeltaNetMixer._params)
    assert not {"a_proj", "A_log", "dt_bias"} & set(ungated["params"])


@pytest.mark.parametrize("name,kw", [("deltanet", {}), ("gated_deltanet", {}),
                                     ("deltanet", {"expand_v": 2, "conv_width": 3})])
def test_state_size_is_the_decode_cache(name, kw):
    m = make_mixer(name, 16, 2, **kw)
    x = jnp.zeros((1, 24, 16))
    params = jax.eval_shape(m.init, jax.random.key(0), x)
    cache = jax.eval_shape(lambda p: m.apply(p, x, method="prefill"), params)[2]
    assert state_size(name, 16, 2, 24, **kw) == sum(s.size for s in jax.tree.leaves(cache))
    assert state_size(name, 16, 2, 4 * 24, **kw) == state_size(name, 16, 2, 24, **kw)


def test_flops_follow_the_attributes():
    f = lambda name, **kw: forward_flops(name, 512, 64, 4, **kw)
    assert f("gated_deltanet", expand_v=1) > f("deltanet")  # the gate's logits
    assert f("deltanet", expand_v=2) > f("deltanet")
    assert f("deltanet", chunk=128) > f("deltanet", chunk=64)  # intra-chunk c² terms
    assert f("deltanet", form="recurrent") < f("deltanet")  # d = 16 < c: fewer FLOPs per token
    # a partial chunk is padded and costs a full one
    assert forward_flops("deltanet", 65, 64, 4) - forward_flops("deltanet", 64, 64, 4) > \
        4 * (forward_flops("deltanet", 64, 64, 4) / 64)
    assert costs.delta_state(64, 4, {"expand_v": 1, "conv_width": 4}, 512) == 4 * 16 * 16 + 3 * 192


@pytest.mark.parametrize("kw,match", [
    ({"num_heads": 3}, "not divisible"),
    ({"expand_v": 0}, "expand_v"),
    ({"expand_v": 0.3}, "expand_v"),
    ({"chunk": 0}, "chunk"),
    ({"form": "dual"}, "form"),
    ({"conv_width": 0}, "conv_width"),
])
def test_bad_attributes_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        DeltaNetMixer(**{"width": 8, "num_heads": 2, **kw})
