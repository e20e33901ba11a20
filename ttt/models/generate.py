"""Autoregressive sampling from a CausalLM: prefill the prompt, then one `step` per new token.

`generate`: the whole loop (prefill + `lax.scan` over steps) is one jitted function, compiled once
per (model, prompt shape, max_new_tokens, top_k, greedy); temperature and the key are traced.
`generate_chunks` yields the same tokens `chunk` at a time (prefill, then a jitted scan of `chunk`
steps carrying the cache and the key), so a long generation can be shown as it goes and never
holds a scan output of max_new_tokens; the key is split in the same order, so both give the same
tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature, top_k: int | None,
                  greedy: bool) -> jax.Array:
    """Pick one token per row. logits (B, V) float32 -> tokens (B,) int32.

    greedy: argmax. Otherwise sample from softmax(logits / temperature), restricted to the
    `top_k` largest logits when top_k is given.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1): the k-th largest logit
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy"))
def _generate(model: nn.Module, variables, prompt, key, temperature, *, max_new_tokens: int,
              top_k: int | None, greedy: bool):
    batch = prompt.shape[0]
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, greedy=greedy)
    cache = model.apply(variables, batch, method="init_cache")
    logits, cache = model.apply(variables, prompt, cache, method="prefill")  # (B, N0, V)
    key, sub = jax.random.split(key)
    first = sample(logits[:, -1], sub)  # (B,)

    def body(carry, _):
        token, cache, key = carry
        logits, cache = model.apply(variables, token[:, None], cache, method="step")  # (B, 1, V)
        key, sub = jax.random.split(key)
        nxt = sample(logits[:, 0], sub)
        return (nxt, cache, key), nxt

    _, rest = jax.lax.scan(body, (first, cache, key), None, length=max_new_tokens - 1)
    new = jnp.concatenate([first[:, None], rest.T], axis=1)  # (B, max_new_tokens)
    return jnp.concatenate([prompt, new], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "top_k", "greedy"))
def _prefill(model: nn.Module, variables, prompt, key, temperature, *, top_k: int | None,
             greedy: bool):
    """(first new token (B,), cache, key) after reading `prompt`."""
    cache = model.apply(variables, prompt.shape[0], method="init_cache")
    logits, cache = model.apply(variables, prompt, cache, method="prefill")  # (B, N0, V)
    key, sub = jax.random.split(key)
    return sample_logits(logits[:, -1], sub, temperature=temperature, top_k=top_k,
                         greedy=greedy), cache, key


@functools.partial(jax.jit, static_argnames=("model", "length", "top_k", "greedy"))
def _steps(model: nn.Module, variables, token, cache, key, temperature, *, length: int,
           top_k: int | None, greedy: bool):
    """`length` decode steps from `token` (B,): (new tokens (B, length), (token, cache, key))."""
    def body(carry, _):
        token, cache, key = carry
        logits, cache = model.apply(variables, token[:, None], cache, method="step")  # (B, 1, V)
        key, sub = jax.random.split(key)
        nxt = sample_logits(logits[:, 0], sub, temperature=temperature, top_k=top_k,
                            greedy=greedy)
        return (nxt, cache, key), nxt

    carry, new = jax.lax.scan(body, (token, cache, key), None, length=length)
    return new.T, carry  # (B, length)


def generate_chunks(model: nn.Module, variables, prompt, max_new_tokens: int, *,
                    key: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                    greedy: bool = False, chunk: int = 256) -> Iterator[jax.Array]:
    """`generate`'s new tokens, `chunk` at a time: yields (B, n) int32 arrays, n <= chunk, that
    concatenate to `generate(...)[:, N0:]`."""
    prompt = _check(prompt, max_new_tokens, top_k)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if max_new_tokens == 0:
        return
    temperature = jnp.float32(temperature)
    token, cache, key = _prefill(model, variables, prompt, key, temperature, top_k=top_k,
                                 greedy=greedy)
    pending, done = [token[:, None]], 1  # the first new token (B, 1)
    while True:
        length = min(chunk - sum(p.shape[1] for p in pending), max_new_tokens - done)
        if length > 0:
            new, (token, cache, key) = _steps(model, variables, token, cache, key, temperature,
                                              length=length, top_k=top_k, greedy=greedy)
            pending.append(new)
            done += length
        yield pending[0] if len(pending) == 1 else jnp.concatenate(pending, axis=1)
        pending = []
        if done >= max_new_tokens:
            return


def _check(prompt, max_new_tokens: int, top_k: int | None) -> jax.Array:
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1) int32, got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and not 1 <= top_k:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    return prompt


def generate(model: nn.Module, variables, prompt, max_new_tokens: int, *, key: jax.Array,
             temperature: float = 1.0, top_k: int | None = None,
             greedy: bool = False) -> jax.Array:
    """Continue `prompt` (B, N0) int32 by `max_new_tokens` tokens -> (B, N0 + max_new_tokens) int32.

    `key` is an explicit PRNG key (ignored when greedy). The prompt must hold at least one token.
    """
    prompt = _check(prompt, max_new_tokens, top_k)
    if max_new_tokens == 0:
        return prompt
    return _generate(model, variables, prompt, key, jnp.float32(temperature),
                     max_new_tokens=max_new_tokens, top_k=top_k, greedy=greedy)
