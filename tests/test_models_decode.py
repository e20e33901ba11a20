"""CausalLM decoding: prefill(N1) + (N - N1) steps reproduces the full forward, for every causal
mixer; `generate` (greedy) agrees with teacher-forced argmax; TTT caches do not grow with context.

One model per mixer is built and compiled once (module fixture); the prompt length N1 is a multiple
of the mini-batch b (whole mini-batches) or not (a partial one carried into decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from conftest import assert_close, rel_err

from ttt.layers import accepted_kwargs
from ttt.models import build_model, generate

CAUSAL = ["ttt_linear", "ttt_mlp", "ttt_linear_mamba", "softmax", "linear_attention", "lact"]
CAUSAL += ["deltanet", "gated_deltanet", "swa"]
B, N, V, MB = 2, 12, 32, 4  # batch, sequence, vocab, TTT mini-batch b


def config(mixer: str, dtype: str = "float32") -> ml_collections.ConfigDict:
    kw = {"mini_batch": MB} if "mini_batch" in accepted_kwargs(mixer) else {}
    if "cache_size" in accepted_kwargs(mixer):
        kw["cache_size"] = 16
    if "expand_v" in accepted_kwargs(mixer):  # DeltaNet: chunks of b, prompts end mid-chunk
        kw["chunk"] = MB
    if "window" in accepted_kwargs(mixer):  # sliding window: the ring buffer wraps in decoding
        kw["window"] = 3
    if "fw_heads" in accepted_kwargs(mixer):  # LaCT: chunks of b, a window shorter than a chunk
        kw.update(chunk=MB, window=3, fw_heads=2)
    return ml_collections.ConfigDict(dict(
        kind="lm", preset="tiny", mixer=mixer, mixer_kwargs=kw, dtype=dtype, scan_layers=True,
        remat="none", vocab_size=V, width=16, num_heads=2, ffn_dim=32))


# Tiny graphs: compile time dominates, so trade XLA optimisation for compile speed.
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


class Compiled:
    """A model, its variables, full-forward logits and decoded logits, from one compilation.

    `run(ids, ttt_lr_mult)` -> dict: variables, logits / aux of the forward, decode_b /
    decode_b2 (prefill of b or b + 2 tokens, then one step per token), and wrong_step (the
    step after b tokens taken from an empty cache, a negative control).
    """

    def __init__(self, mixer: str, dtype: str = "float32"):
        self.mixer = mixer
        self.model = model = build_model(config(mixer, dtype))
        self.ids = jax.random.randint(jax.random.key(0), (B, N), 0, V)

        def decode(v, ids, n1):
            logits, cache = model.apply(v, ids[:, :n1], None, method="prefill")  # (B, n1, V)

            def body(cache, token):  # token (B,)
                step_logits, cache = model.apply(v, token[:, None], cache, method="step")
                return cache, step_logits[:, 0]

            _, rest = jax.lax.scan(body, cache, ids[:, n1:].T)  # (N - n1, B, V)
            return jnp.concatenate([logits, rest.transpose(1, 0, 2)], axis=1)  # (B, N, V)

        def run(ids, mult):
            v = model.init(jax.random.key(1, impl="rbg"), ids)
            logits, aux = model.apply(v, ids, ttt_lr_mult=mult)
            fresh = model.apply(v, B, method="init_cache")
            wrong, _ = model.apply(v, ids[:, MB:MB + 1], fresh, method="step")
            return dict(variables=v, logits=logits, aux=aux, decode_b=decode(v, ids, MB),
                        decode_b2=decode(v, ids, MB + 2), wrong_step=wrong)

        self.run = fast_jit(run)
        self.out = self.run(self.ids, 1.0)


@functools.cache
def compiled(mixer: str) -> Compiled:
    return Compiled(mixer)


@pytest.mark.parametrize("mixer", CAUSAL)
def test_prefill_then_steps_equals_forward(mixer):
    out = compiled(mixer).out
    assert_close(out["decode_b"], out["logits"], 1e-4, f"{mixer} prefill(N1=b) + steps")
    assert_close(out["decode_b2"], out["logits"], 1e-4, f"{mixer} prefill(N1=b+2) + steps")
    # negative control: a step that forgets the prompt must not match
    assert rel_err(out["wrong_step"], out["logits"][:, MB:MB + 1]) > 1e-3


@pytest.mark.slow  # a separate float64 compilation of the whole model
def test_decode_float64(x64):
    out = Compiled("ttt_linear_mamba", dtype="float64").out
    assert out["logits"].dtype == jnp.float64
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(out["variables"]))
    assert_close(out["decode_b"], out["logits"], 1e-10, "float64 prefill(N1=b) + steps")
    assert_close(out["decode_b2"], out["logits"], 1e-10, "float64 prefill(N1=b+2) + steps")


@pytest.mark.parametrize("mixer", ["ttt_linear", "ttt_mlp", "ttt_linear_mamba"])
def test_ttt_cache_size_independent_of_context(mixer):
    c = compiled(mixer)
    variables = c.out["variables"]
    prefill = lambda v, x: c.model.apply(v, x, None, method="prefill")[1]
    shapes = lambda n: jax.tree.map(lambda s: (s.shape, s.dtype),
                                    jax.eval_shape(prefill, variables, c.ids[:, :n]))
    init = jax.tree.map(lambda s: (s.shape, s.dtype), jax.eval_shape(
        lambda v: c.model.apply(v, B, method="init_cache"), variables))
    assert shapes(3) == shapes(N) == shapes(4 * N) == init
    # every leaf has the leading layer axis
    assert all(s[0][0] == 2 for s in jax.tree.leaves(init, is_leaf=lambda x: isinstance(x, tuple)))


def test_forward_aux_and_lr_mult():
    c = compiled("ttt_linear")
    logits, aux = c.out["logits"], c.out["aux"]
    assert logits.shape == (B, N, V) and logits.dtype == jnp.float32
    losses = [k for k in aux if k.startswith("inner_loss")]
    assert losses, f"no inner-loss diagnostics in aux: {sorted(aux)}"
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(aux))  # (layers, ...)
    # ttt_lr_mult reaches the inner loop (softmax attention ignores it)
    assert rel_err(c.run(c.ids, 0.5)["logits"], logits) > 1e-4
    s = compiled("softmax")
    assert_close(s.run(s.ids, 0.5)["logits"], s.out["logits"], 0.0, "softmax ignores mult")


def teacher_forced_argmax(c: Compiled, tokens) -> jax.Array:
    """argmax of the full forward over `tokens` (B, N): the greedy choice after each prefix
    (causal, so position t sees tokens <= t only)."""
    return jnp.argmax(c.run(tokens, 1.0)["logits"], axis=-1)  # (B, N)


@pytest.mark.parametrize("mixer,kw", [("ttt_linear_mamba", dict(greedy=True)),
                                      ("linear_attention", dict(top_k=1, temperature=3.0))],
                         ids=["greedy", "top_k=1"])
def test_generate_matches_teacher_forced_argmax(mixer, kw):
    c, n0 = compiled(mixer), N - 4
    out = generate(c.model, c.out["variables"], c.ids[:, :n0], 4, key=jax.random.key(0), **kw)
    assert out.shape == (B, N) and out.dtype == jnp.int32
    assert bool(jnp.all(out[:, :n0] == c.ids[:, :n0]))
    assert bool(jnp.all(teacher_forced_argmax(c, out)[:, n0 - 1:-1] == out[:, n0:]))
    # negative control: the prompt's own continuation is (almost surely) not the greedy one
    assert not bool(jnp.all(teacher_forced_argmax(c, c.ids)[:, n0 - 1:-1] == c.ids[:, n0:]))


def test_generate_sampling_controls():
    c = compiled("linear_attention")
    variables, prompt, key = c.out["variables"], c.ids[:, :5], jax.random.key(3)
    sample = lambda k: generate(c.model, variables, prompt, 3, key=k, temperature=2.0)
    a = sample(key)
    assert bool(jnp.all(sample(key) == a)) and bool(jnp.all((a >= 0) & (a < V)))
    assert any(bool(jnp.any(sample(jax.random.key(s)) != a)) for s in range(4, 8))  # key matters
    assert generate(c.model, variables, prompt, 0, key=key).shape == prompt.shape
    with pytest.raises(ValueError, match="prompt must be"):
        generate(c.model, variables, prompt[0], 2, key=key)
