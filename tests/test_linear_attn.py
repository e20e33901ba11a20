"""Linear attention: the quadratic, cumsum and chunked forms agree with each other and with numpy
references (causal and not, every feature map × normaliser, chunk sizes that do not divide N,
float32); decoding == the causal forward."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
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
