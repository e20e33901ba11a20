"""The Mamba2 mixer: the layer (every scan form) against a token-by-token NumPy recurrence written
here from the paper's equations, gradients equal across forms, prefill + steps == forward at the
layer and in the LM, the registry's state size == the decode cache, initialisation ranges, and
argument errors. Negative controls: the recurrence with the decay after the update, and with the
norm before the gate, must not match."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.layers import Mamba2Mixer, forward_flops, make_mixer, state_size
from ttt.models import build_model

B, N, C = 2, 11, 16  # N: not a multiple of the chunk
KW = dict(d_state=8, head_dim=8, chunk=4)  # E = 32: 4 heads of 8
FORMS = ("chunked", "cumsum", "quadratic")


def _softplus(x):
    return np.logaddexp(0.0, x)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def reference(p, x, module, variant=None):
    """Mamba2 token by token in NumPy float64, from the equations (not the layer's code).

    variant: None, "decay_after" (S = a (S + B (Δx)ᵀ): the decay applied after the update) or
    "norm_first" (RMSNorm(y) ⊙ SiLU(z)): the negative controls.
    """
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p["params"])
    x = np.asarray(x, np.float64)
    Bt, T, _ = x.shape
    E, Ns, H, P, w = module.inner, module.d_state, module.heads, module.head, module.conv_width
    proj = x @ p["in_proj"]["kernel"]  # (B, T, 2E + 2Ns + H)
    z, xbc, dt = proj[..., :E], proj[..., E:2 * E + 2 * Ns], proj[..., 2 * E + 2 * Ns:]
    kern, bias = p["conv1d"]["kernel"][:, 0, :], p["conv1d"]["bias"]  # (w, F), (F,)
    padded = np.concatenate([np.zeros((Bt, w - 1, xbc.shape[-1])), xbc], axis=1)
    conv = np.stack([sum(padded[:, t + i] * kern[i] for i in range(w)) + bias for t in range(T)],
                    axis=1)
    xbc = _silu(conv)
    xs, Bs, Cs = xbc[..., :E], xbc[..., E:E + Ns], xbc[..., E + Ns:]
    delta = _softplus(dt + p["dt_bias"])  # (B, T, H)
    A = -np.exp(p["A_log"])  # (H,)
    S = np.zeros((Bt, H, Ns, P))
    out = []
    for t in range(T):
        a = np.exp(delta[:, t] * A)[..., None, None]  # (B, H, 1, 1)
        xh = xs[:, t].reshape(Bt, H, P)
        update = np.einsum("bn,bhp->bhnp", Bs[:, t], xh * delta[:, t, :, None])
        S = a * (S + update) if variant == "decay_after" else a * S + update
        y = (np.einsum("bn,bhnp->bhp", Cs[:, t], S) + p["D"][:, None] * xh).reshape(Bt, E)
        rms = lambda g: g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + module.norm_eps)
        if variant == "norm_first":
            g = rms(y) * _silu(z[:, t]) * p["norm_scale"]
        else:
            g = rms(y * _silu(z[:, t])) * p["norm_scale"]
        out.append(g @ p["out_proj"]["kernel"])
    return np.stack(out, axis=1)


def _setup(dtype=jnp.float64, **kw):
    # init_scale 0.5: B, C of order one, so the scan (not the D·x skip) carries the output
    module = make_mixer("mamba2", C, 2, dtype=dtype, param_dtype=dtype, init_scale=0.5,
                        **{**KW, **kw})
    x = jax.random.normal(jax.random.key(0), (B, N, C), dtype)
    p = module.init(jax.random.key(1), x)
    # larger-than-init Δ and dt so the decay matters over 11 tokens
    p = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 1.0 if "dt_bias" in jax.tree_util.keystr(path) else a, p)
    return module, p, x


@pytest.mark.parametrize("form", FORMS)
def test_layer_equals_token_loop_reference(x64, form):
    module, p, x = _setup(form=form)
    y, aux = module.apply(p, x)
    assert aux == {} and y.shape == (B, N, C) and y.dtype == jnp.float64
    err = assert_close(y, reference(p, x, module), 1e-10, f"mamba2 {form} vs token loop")
    print(f"{form}: rel err {err:.1e}")


def test_reference_negative_controls(x64):
    module, p, x = _setup()
    y = module.apply(p, x)[0]
    for variant in ("decay_after", "norm_first"):
        err = rel_err(y, reference(p, x, module, variant))
        print(f"{variant}: rel err {err:.2e}")
        assert err > 1e-2, variant


@pytest.mark.parametrize("form", ["quadratic", pytest.param("cumsum", marks=pytest.mark.slow)])
def test_gradients_equal_across_forms(x64, form):
    module, p, x = _setup()

    def grads(form):
        m = module.clone(form=form)
        loss = lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)[0]))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x)

    chunked = grads("chunked")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(chunked))
    err = assert_close(grads(form), chunked, 1e-9, f"gradients {form} vs chunked")
    print(f"grad {form}: rel err {err:.1e}")


@pytest.mark.parametrize("n1", [1, 5, N])  # shorter than the conv tail, inside, whole sequence
def test_prefill_then_steps_equals_forward(x64, n1):
    module, p, x = _setup()
    y = module.apply(p, x)[0]
    y0, aux, cache = module.apply(p, x[:, :n1], method="prefill")
    assert aux == {}
    outs = [y0]
    step = jax.jit(lambda x_t, cache: module.apply(p, x_t, cache, method="step"))
    for t in range(n1, N):
        y_t, cache = step(x[:, t:t + 1], cache)
        outs.append(y_t)
    assert_close(jnp.concatenate(outs, axis=1), y, 1e-10, f"prefill({n1}) + steps")
    # the cache after the whole sequence equals the one a prefill of it builds
    if n1 < N:
        assert_close(cache, module.apply(p, x, method="prefill")[2], 1e-10, "final cache")
    # negative control: a step from an empty cache forgets the prompt
    if n1 < N:
        fresh = module.apply(p, B, method="init_cache")
        wrong = step(x[:, n1:n1 + 1], fresh)[0]
        assert rel_err(wrong, y[:, n1:n1 + 1]) > 1e-3


def test_lm_prefill_then_steps_equals_forward():
    V, n1 = 32, 5
    model = build_model(ml_collections.ConfigDict(dict(
        kind="lm", preset="tiny", mixer="mamba2", mixer_kwargs=KW, vocab_size=V, width=C,
        num_heads=2, ffn_dim=32)))
    ids = jax.random.randint(jax.random.key(0), (B, N), 0, V)

    @jax.jit
    def run(ids):
        v = model.init(jax.random.key(1), ids)
        logits, _ = model.apply(v, ids)
        first, cache = model.apply(v, ids[:, :n1], method="prefill")

        def body(cache, token):
            out, cache = model.apply(v, token[:, None], cache, method="step")
            return cache, out[:, 0]

        _, rest = jax.lax.scan(body, cache, ids[:, n1:].T)
        return logits, jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)

    logits, decoded = run(ids)
    assert_close(decoded, logits, 1e-4, "LM prefill + steps")


def test_paper_defaults_and_one_head_fallback():
    big = make_mixer("mamba2", 768, 12)
    assert (big.d_state, big.head, big.expand, big.conv_width) == (128, 64, 2, 4)
    assert (big.inner, big.heads) == (1536, 24)  # heads from expand·C / P, not num_heads
    tiny = make_mixer("mamba2", 16, 2)  # E = 32 < head_dim 64: one head of 32
    assert (tiny.head, tiny.heads) == (32, 1)
    x = jnp.zeros((1, 3, 16))
    shapes = jax.eval_shape(tiny.init, jax.random.key(0), x)["params"]
    assert shapes["in_proj"]["kernel"].shape == (16, 2 * 32 + 2 * 128 + 1)
    assert shapes["conv1d"]["kernel"].shape == (4, 1, 32 + 2 * 128)
    assert shapes["out_proj"]["kernel"].shape == (32, 16)


def test_init_ranges():
    module = make_mixer("mamba2", 256, 4, d_state=16)  # 8 heads of 64
    p = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 2, 256)))["params"]
    dt = jax.nn.softplus(p["dt_bias"])
    assert bool(jnp.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))), dt
    A = -jnp.exp(p["A_log"])
    assert bool(jnp.all((A >= -16.0001) & (A <= -0.9999))), A
    assert bool(jnp.all(p["D"] == 1.0)) and bool(jnp.all(p["norm_scale"] == 1.0))


def test_state_size_and_flops_follow_the_cache_and_form():
    kw = dict(d_state=8, head_dim=8)
    module = make_mixer("mamba2", C, 2, **kw)
    x = jnp.zeros((1, N, C))
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    cache = jax.eval_shape(lambda p: module.apply(p, x, method="prefill"), params)[2]
    floats = sum(int(np.prod(leaf.shape[1:])) for leaf in jax.tree.leaves(cache))
    assert state_size("mamba2", C, 2, N, **kw) == floats == 4 * 8 * 8 + 3 * (32 + 16)
    f = lambda n, **k: forward_flops("mamba2", n, 64, 4, **k)
    assert f(512) == pytest.approx(2 * f(256))  # linear in N (chunked)
    assert f(512, form="quadratic") > f(512, form="cumsum")


def test_bad_arguments_raise():
    bad = [(dict(head_dim=48), "head_dim"), (dict(form="fft"), "form"),
           (dict(d_state=0), "d_state"), (dict(dt_min=0.2), "dt_min"),
           (dict(expand=1.5), "expand")]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            make_mixer("mamba2", 64, 2, **kw)
    with pytest.raises(ValueError, match="unknown argument"):
        make_mixer("mamba2", 64, 2, ngroups=2)
    assert isinstance(make_mixer("mamba2", C, 2, **KW), Mamba2Mixer)


def test_chunk_size_invariance(x64):
    module, p, x = _setup()
    ys = [jax.jit(module.clone(chunk=c).apply)(p, x)[0] for c in (1, 4, 64)]
    for c, y in zip((1, 64), (ys[0], ys[2]), strict=True):
        assert_close(y, ys[1], 1e-12, f"chunk {c} vs 4")


def test_bfloat16_compute_tracks_float32():
    module, p, x = _setup(dtype=jnp.float32)
    y32 = module.apply(p, x)[0]
    y16 = module.clone(dtype=jnp.bfloat16).apply(p, x)[0]
    assert y16.dtype == jnp.bfloat16
    err = rel_err(y16, y32)
    assert err < 3e-2, err  # bf16 projections and conv; the scan itself runs in float32
