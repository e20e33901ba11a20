"""Linear attention: the quadratic, cumsum and chunked forms agree with each other and with numpy
references (causal and not, every feature map × normaliser, chunk sizes that do not divide N,
float32); decoding == the causal forward. The per-token decay gate (log_alpha): the three forms
agree with a numpy recurrence and each other (values and gradients), a zero gate is no gate, decode
replays the forward, a very strong decay keeps only the current token, negative controls, errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err
from test_attn_common import DV, B, D, H, N, _qkv

from ttt.ops.linear_attn import (
    linear_attention,
    linear_attention_decode_step,
    linear_attention_init_state,
)


def _np_phi(x, feature_map):
    x = np.asarray(x, np.float64)
    return x if feature_map is None else np.where(x > 0, x + 1.0, np.exp(x))


def _np_linear_attention(q, k, v, causal, feature_map, normalize, eps=1e-6):
    """Token loop in float64 numpy: z_t = Σ_s v_s (φ(k_s)·φ(q_t)) [/ normaliser]."""
    fq, fk, v = _np_phi(q, feature_map), _np_phi(k, feature_map), np.asarray(v, np.float64)
    z = np.zeros(v.shape)
    n = q.shape[2]
    for t in range(n):
        seen = t + 1 if causal else n
        w = np.einsum("bhd,bhsd->bhs", fq[:, :, t], fk[:, :, :seen])  # (B, H, seen)
        num = np.einsum("bhs,bhsv->bhv", w, v[:, :, :seen])  # (B, H, dv)
        if normalize == "adaptive":
            num = num / (w.sum(-1) + eps)[..., None]
        elif normalize == "constant":
            num = num / seen
        z[:, :, t] = num
    return z



COMBOS = list(itertools.product([None, "elu"], [None, "adaptive", "constant"]))
FORMS = ("quadratic", "cumsum", "chunked")


def _tol(feature_map, normalize):
    # φ = identity lets the adaptive denominator Σ φ(k)·φ(q) come near zero, which amplifies
    # rounding; every form computes the same formula with the same eps.
    return 1e-8 if normalize == "adaptive" and feature_map is None else 1e-10


def _key(causal, feature_map, normalize, form) -> str:
    return f"causal={causal} feature_map={feature_map} normalize={normalize} form={form}"


@jax.jit
def _all_linear_variants(q, k, v):
    """{(causal, feature_map, normalize, form): z}, one compile (one per variant is slow on CPU)."""
    return {
        _key(causal, fm, nm, form): linear_attention(
            q, k, v, causal=causal, feature_map=fm, normalize=nm, form=form, chunk=5
        )
        for causal in (True, False)
        for fm, nm in COMBOS
        for form in FORMS
    }


def test_linear_attention_forms_agree_causal(x64):
    """chunked (c = 5, N = 13) == cumsum == quadratic == numpy token loop, every φ × normaliser."""
    q, k, v = _qkv("float64", seed=1)
    outs = _all_linear_variants(q, k, v)
    for fm, nm in COMBOS:
        what = f"causal feature_map={fm} normalize={nm}"
        expected = _np_linear_attention(q, k, v, True, fm, nm)
        quad = outs[_key(True, fm, nm, "quadratic")]
        assert_close(quad, expected, _tol(fm, nm), f"{what}: quadratic vs numpy loop")
        for form in ("cumsum", "chunked"):
            assert_close(outs[_key(True, fm, nm, form)], quad, _tol(fm, nm), f"{what}: {form}")


def test_linear_attention_noncausal_equals_einsum(x64):
    q, k, v = _qkv("float64", seed=1)
    outs = _all_linear_variants(q, k, v)
    for fm, nm in COMBOS:
        fq, fk = _np_phi(q, fm), _np_phi(k, fm)
        S = np.einsum("bhsd,bhsv->bhdv", fk, np.asarray(v))  # (B, H, d, dv) global state
        expected = np.einsum("bhtd,bhdv->bhtv", fq, S)  # (B, H, N, dv)
        if nm == "adaptive":
            expected = expected / (np.einsum("bhtd,bhd->bht", fq, fk.sum(2)) + 1e-6)[..., None]
        elif nm == "constant":
            expected = expected / N
        for form in FORMS:
            z = outs[_key(False, fm, nm, form)]
            assert_close(z, expected, _tol(fm, nm), f"non-causal {form} φ={fm} norm={nm}")
        # Negative control: the causal sum is a different operator.
        assert rel_err(outs[_key(True, fm, nm, "quadratic")], expected) > 1e-2


def test_linear_attention_chunk_invariance(x64):
    q, k, v = _qkv("float64", seed=1)
    kw = dict(causal=True, feature_map="elu", normalize="adaptive")
    expected = _np_linear_attention(q, k, v, True, "elu", "adaptive")
    chunks = (1, N, 64)  # one token, exactly N, past the end (5 is in the test above)
    outs = jax.jit(
        lambda q, k, v: [linear_attention(q, k, v, form="chunked", chunk=c, **kw) for c in chunks]
    )(q, k, v)
    for chunk, z in zip(chunks, outs, strict=True):
        assert_close(z, expected, 1e-10, f"chunked(c={chunk}) vs numpy loop")


def test_linear_attention_float32(x64):
    q, k, v = _qkv("float32", seed=3)
    expected = _np_linear_attention(q, k, v, True, "elu", "adaptive")
    outs = jax.jit(
        lambda q, k, v: [
            linear_attention(q, k, v, form=f, chunk=4, feature_map="elu", normalize="adaptive")
            for f in FORMS
        ]
    )(q, k, v)
    for form, z in zip(FORMS, outs, strict=True):
        assert z.dtype == jnp.float32
        assert_close(z, expected, 1e-5, f"float32 {form} vs float64 numpy")


def test_linear_attention_decode_equals_forward(x64):
    q, k, v = _qkv("float64", seed=4)

    @jax.jit
    def decode_all(q, k, v):
        """Token-by-token decoding as a scan over t, for every φ × normaliser: one compile."""
        tokens = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v))  # (N, B, H, ·) each
        outs = {}
        for fm, nm in COMBOS:

            def step(state, xs, fm=fm, nm=nm):
                q_t, k_t, v_t, t = xs
                return linear_attention_decode_step(
                    state, q_t, k_t, v_t, feature_map=fm, normalize=nm, position=t
                )[::-1]

            state0 = linear_attention_init_state(B, H, D, DV, jnp.float64)
            state, zs = jax.lax.scan(step, state0, (*tokens, jnp.arange(N)))
            outs[f"{fm}-{nm}"] = (jnp.moveaxis(zs, 0, 2), state)  # (B, H, N, dv)
        return outs

    forward = _all_linear_variants(q, k, v)
    decoded = decode_all(q, k, v)
    for fm, nm in COMBOS:
        z, state = decoded[f"{fm}-{nm}"]
        full = forward[_key(True, fm, nm, "quadratic")]
        assert_close(z, full, _tol(fm, nm), f"decode steps vs causal forward φ={fm} norm={nm}")
        S = np.einsum("bhsd,bhsv->bhdv", _np_phi(k, fm), np.asarray(v))  # (B, H, d, dv)
        assert_close(state["S"], S, 1e-10, "final decode state")


# ----------------------------------------------------------------------------- decay gate


def _log_alpha(seed=0, n=N, scale=0.5):
    """(B, H, n) log-decays ≤ 0 (numpy draws), a mix of weak and strong decays."""
    return jnp.asarray(-np.random.default_rng(seed).exponential(scale, (B, H, n)), jnp.float64)


def _np_gated(q, k, v, log_alpha, feature_map, normalize, eps=1e-6, after=False):
    """Token loop in float64 numpy: S_t = a_t S_{t−1} + φ(k_t) v_tᵀ, s_t = a_t s_{t−1} + φ(k_t).

    after=True is the negative control: the decay is applied after the update (S_t = a_t (S_{t−1}
    + φ(k_t) v_tᵀ)), which also decays the current token.
    """
    fq, fk, v = _np_phi(q, feature_map), _np_phi(k, feature_map), np.asarray(v, np.float64)
    a = np.exp(np.asarray(log_alpha, np.float64))
    S = np.zeros((*fq.shape[:2], fq.shape[-1], v.shape[-1]))
    s = np.zeros((*fq.shape[:2], fq.shape[-1]))
    z = np.zeros(v.shape)
    for t in range(q.shape[2]):
        at = a[:, :, t, None]
        if after:
            S = at[..., None] * (S + np.einsum("bhd,bhv->bhdv", fk[:, :, t], v[:, :, t]))
            s = at * (s + fk[:, :, t])
        else:
            S = at[..., None] * S + np.einsum("bhd,bhv->bhdv", fk[:, :, t], v[:, :, t])
            s = at * s + fk[:, :, t]
        num = np.einsum("bhd,bhdv->bhv", fq[:, :, t], S)
        if normalize == "adaptive":
            num = num / (np.einsum("bhd,bhd->bh", fq[:, :, t], s) + eps)[..., None]
        elif normalize == "constant":
            num = num / (t + 1)
        z[:, :, t] = num
    return z


@jax.jit
def _all_gated_variants(q, k, v, log_alpha):
    """{(feature_map, normalize, form): z} with the gate, chunk 5 (N = 13): one compile."""
    return {
        _key(True, fm, nm, form): linear_attention(
            q, k, v, feature_map=fm, normalize=nm, form=form, chunk=5, log_alpha=log_alpha
        )
        for fm, nm in COMBOS
        for form in FORMS
    }


def test_gated_forms_agree(x64):
    """Gated: quadratic == numpy recurrence; cumsum (scan) and chunked (c = 5) == quadratic."""
    q, k, v = _qkv("float64", seed=5)
    log_alpha = _log_alpha(seed=5)
    outs = _all_gated_variants(q, k, v, log_alpha)
    ungated = _all_linear_variants(q, k, v)
    for fm, nm in COMBOS:
        what = f"gated feature_map={fm} normalize={nm}"
        quad = outs[_key(True, fm, nm, "quadratic")]
        assert_close(quad, _np_gated(q, k, v, log_alpha, fm, nm), _tol(fm, nm), f"{what}: numpy")
        for form in ("cumsum", "chunked"):
            assert_close(outs[_key(True, fm, nm, form)], quad, _tol(fm, nm), f"{what}: {form}")
        # The gate changes the result (it is not silently ignored).
        assert rel_err(quad, ungated[_key(True, fm, nm, "quadratic")]) > 1e-2, what


def test_gated_chunk_sizes(x64):
    """Chunked with a gate for c = 1, N, past the end, and c = 4 (N = 13): == numpy recurrence."""
    q, k, v = _qkv("float64", seed=6)
    log_alpha = _log_alpha(seed=6)
    expected = _np_gated(q, k, v, log_alpha, "elu", "adaptive")
    chunks = (1, 4, N, 64)
    outs = jax.jit(
        lambda q, k, v, la: [
            linear_attention(
                q, k, v, feature_map="elu", normalize="adaptive", chunk=c, log_alpha=la
            )
            for c in chunks
        ]
    )(q, k, v, log_alpha)
    for chunk, z in zip(chunks, outs, strict=True):
        assert_close(z, expected, 1e-10, f"gated chunked(c={chunk}) vs numpy recurrence")


@pytest.mark.parametrize("fm,nm", [(None, None), ("elu", "adaptive")])
def test_gated_gradients_chunked_equal_quadratic(x64, fm, nm):
    """d/d(q, k, v, log_alpha) of a random projection: chunked (c = 5) == cumsum == quadratic."""
    q, k, v = _qkv("float64", seed=7)
    log_alpha = _log_alpha(seed=7)
    w = jnp.asarray(np.random.default_rng(8).standard_normal((B, H, N, DV)))

    def loss(form):
        return lambda *a: jnp.sum(
            w
            * linear_attention(
                *a[:3], feature_map=fm, normalize=nm, form=form, chunk=5, log_alpha=a[3]
            )
        )

    grads = jax.jit(lambda *a: {f: jax.grad(loss(f), argnums=(0, 1, 2, 3))(*a) for f in FORMS})(
        q, k, v, log_alpha
    )
    for form in ("chunked", "cumsum"):
        for name, g, g_ref in zip(
            "q k v log_alpha".split(), grads[form], grads["quadratic"], strict=True
        ):
            assert_close(g, g_ref, _tol(fm, nm), f"grad {name} {form} vs quadratic φ={fm} {nm}")
    assert float(jnp.max(jnp.abs(grads["quadratic"][3]))) > 1e-3  # the gate gradient is live


def test_gate_zero_equals_no_gate(x64):
    """log_alpha = 0 (a = 1) is today's linear attention, every form × φ × normaliser."""
    q, k, v = _qkv("float64", seed=1)
    outs = _all_gated_variants(q, k, v, jnp.zeros((B, H, N), jnp.float64))
    ungated = _all_linear_variants(q, k, v)
    for fm, nm in COMBOS:
        for form in FORMS:
            key = _key(True, fm, nm, form)
            assert_close(outs[key], ungated[key], _tol(fm, nm), f"zero gate vs none: {key}")


def test_gated_decode_equals_forward(x64):
    q, k, v = _qkv("float64", seed=9)
    log_alpha = _log_alpha(seed=9)

    @jax.jit
    def decode_all(q, k, v, log_alpha):
        tokens = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, log_alpha))  # (N, B, H, ·)
        outs = {}
        for fm, nm in COMBOS:

            def step(state, xs, fm=fm, nm=nm):
                q_t, k_t, v_t, la_t, t = xs
                return linear_attention_decode_step(
                    state,
                    q_t,
                    k_t,
                    v_t,
                    feature_map=fm,
                    normalize=nm,
                    position=t,
                    log_alpha_t=la_t,
                )[::-1]

            state0 = linear_attention_init_state(B, H, D, DV, jnp.float64)
            state, zs = jax.lax.scan(step, state0, (*tokens, jnp.arange(N)))
            outs[f"{fm}-{nm}"] = (jnp.moveaxis(zs, 0, 2), state)
        return outs

    forward = _all_gated_variants(q, k, v, log_alpha)
    decoded = decode_all(q, k, v, log_alpha)
    a = np.exp(np.asarray(log_alpha))
    for fm, nm in COMBOS:
        z, state = decoded[f"{fm}-{nm}"]
        full = forward[_key(True, fm, nm, "chunked")]
        assert_close(z, full, _tol(fm, nm), f"gated decode vs forward φ={fm} norm={nm}")
        # final state: Σ_s (Π_{r>s} a_r) φ(k_s) v_sᵀ
        to_end = np.flip(np.cumprod(np.flip(a, -1), -1), -1) / a  # Π_{r>s} a_r
        S = np.einsum("bhs,bhsd,bhsv->bhdv", to_end, _np_phi(k, fm), np.asarray(v))
        assert_close(state["S"], S, 1e-10, "final gated decode state")


def test_strong_decay_keeps_only_current_token(x64):
    """log_alpha = −50: every output is the current token's own term, in every form."""
    q, k, v = _qkv("float64", seed=10)
    outs = _all_gated_variants(q, k, v, jnp.full((B, H, N), -50.0, jnp.float64))
    for fm, nm in COMBOS:
        fq, fk = _np_phi(q, fm), _np_phi(k, fm)
        w = np.einsum("bhtd,bhtd->bht", fq, fk)  # (B, H, N): φ(q_t)·φ(k_t)
        expected = w[..., None] * np.asarray(v)
        if nm == "adaptive":
            expected = expected / (w + 1e-6)[..., None]
        elif nm == "constant":
            expected = expected / np.arange(1, N + 1)[:, None]
        for form in FORMS:
            z = outs[_key(True, fm, nm, form)]
            assert np.all(np.isfinite(np.asarray(z)))
            assert_close(z, expected, _tol(fm, nm), f"log_alpha=-50 {form} φ={fm} norm={nm}")


def test_gate_negative_controls(x64):
    """Decay after the update, or Γ transposed, differ from the gated result far past tolerance."""
    q, k, v = _qkv("float64", seed=11)
    log_alpha = _log_alpha(seed=11)
    z = linear_attention(q, k, v, log_alpha=log_alpha, form="chunked", chunk=5)
    assert rel_err(z, _np_gated(q, k, v, log_alpha, None, None, after=True)) > 1e-2
    g = np.cumsum(np.asarray(log_alpha), -1)
    mask = np.tril(np.ones((N, N), bool))
    gam_t = np.where(mask, np.exp(np.where(mask, g[..., None, :] - g[..., :, None], 0.0)), 0.0)
    scores = np.einsum("bhtd,bhsd->bhts", np.asarray(q), np.asarray(k)) * gam_t  # Γᵀ
    assert rel_err(z, np.einsum("bhts,bhsv->bhtv", scores, np.asarray(v))) > 1e-2


def test_gate_errors(x64):
    q, k, v = _qkv("float64", seed=0)
    bad = jnp.zeros((B, H, N), jnp.float64).at[0, 1, 3].set(0.1)
    with pytest.raises(ValueError, match="log_alpha: expected log-decays <= 0"):
        linear_attention(q, k, v, log_alpha=bad)
    with pytest.raises(ValueError, match="log_alpha: a decay gate needs causal=True"):
        linear_attention(q, k, v, causal=False, log_alpha=jnp.zeros((B, H, N)))
    with pytest.raises(ValueError, match=r"log_alpha: expected shape \(B, H, N\)"):
        linear_attention(q, k, v, log_alpha=jnp.zeros((B, H, N + 1)))
    state = linear_attention_init_state(B, H, D, DV, jnp.float64)
    with pytest.raises(ValueError, match="log_alpha_t: expected log-decays <= 0"):
        linear_attention_decode_step(
            state, q[:, :, 0], k[:, :, 0], v[:, :, 0], log_alpha_t=bad[:, :, 3]
        )
