"""Softmax attention and Nadaraya–Watson kernel regression, as pure functions on per-head arrays
(B, H, N, d).

- `softmax_attention`: scaled dot-product attention, causal or not, with memory linear in N:
  cuDNN's fused attention on a GPU (bf16/fp16), elsewhere XLA over rematerialised query chunks.
- `kernel_regression`: the Nadaraya–Watson estimator z_t = Σ_s κ(k_s, q_t) v_s / Σ_s κ(k_s, q_t)
  with an arbitrary kernel. With κ(k, q) = exp(kᵀq/√d) (`exp_kernel`) it *is* softmax attention
  (TTT-LM Theorem 2, docs/design.md §7.3); it is written as an explicit ratio, not via softmax, so
  the test of that identity compares two different computations.

Notable choices: the XLA path is written out rather than taken from jax.nn.dot_product_attention,
whose XLA path rounds the softmax to float32 and needs dv = d (the float64 identities the tests
hold need both); each query chunk is rematerialised in the backward pass, so forward and backward
hold O(N · chunk) scores instead of O(N²).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ttt.ops import checks
from ttt.ops.primitives import causal_mask

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
DEFAULT_CHUNK = 512  # queries per chunk of the "xla" implementation


def softmax_attention(q, k, v, *, causal: bool = True, scale: float | None = None,
                      implementation: str = "auto", chunk: int = DEFAULT_CHUNK) -> jax.Array:
    """Scaled dot-product attention, with memory linear in N.

    q, k: (B, H, N, d); v: (B, H, N, dv) -> z (B, H, N, dv), in q's dtype promoted to at least
    float32 ("xla") or in q's dtype ("cudnn").
    z_t = Σ_s softmax_s(scale · k_s·q_t) v_s over s ≤ t (causal) or all s; scale defaults to 1/√d.
    Causal rows always contain the diagonal, so -inf masking never yields an all-masked row.

    implementation:
      "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused (flash)
        attention on an NVIDIA GPU: inputs bfloat16 or float16, dv = d <= 128 and a multiple of
        8; softmax in float32.
      "xla": XLA, in the inputs' precision promoted to at least float32, over chunks of `chunk`
        queries, each rematerialised in the backward pass (a `jax.checkpoint`ed scan): forward
        and backward hold O(N · chunk) scores instead of O(N²); one chunk when N <= chunk.
        (Written out rather than through jax.nn.dot_product_attention's XLA path, which rounds
        the softmax to float32 and needs dv = d; the float64 identities the tests hold need both.)
      "auto": "cudnn" where it applies (`cudnn_applies`), else "xla".
    """
    checks.check_attention_qkv(q, k, v)
    checks.check_choice("implementation", implementation, IMPLEMENTATIONS)
    checks.check_int("chunk", chunk, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if implementation == "auto":
        implementation = "cudnn" if cudnn_applies(q, v) else "xla"
    if implementation == "cudnn":
        bnhd = lambda x: jnp.swapaxes(x, 1, 2)  # (B, H, N, d) <-> (B, N, H, d)
        z = jax.nn.dot_product_attention(bnhd(q), bnhd(k), bnhd(v), scale=scale,
                                         is_causal=causal, implementation="cudnn")
        return bnhd(z)
    return _xla_chunked(q, k, v, causal, scale, min(int(chunk), q.shape[2]))


def cudnn_applies(q, v) -> bool:
    """Whether cuDNN's fused attention takes q (B, H, N, d), v (B, H, N, dv): a GPU backend,
    bfloat16 or float16, dv = d <= 128 and a multiple of 8."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and v.shape[-1] == d and d <= 128 and d % 8 == 0)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _xla_chunked(q, k, v, causal, scale, chunk):
    B, H, N, d = q.shape
    dt = jnp.promote_types(q.dtype, jnp.float32)
    q, k, v = (x.astype(dt) for x in (q, k, v))
    M = -(-N // chunk)
    # (M, B, H, c, d): query chunks first for the scan; padded queries are sliced off below
    q_c = jnp.pad(q, ((0, 0), (0, 0), (0, M * chunk - N), (0, 0)))
    q_c = jnp.moveaxis(q_c.reshape(B, H, M, chunk, d), 2, 0)

    @jax.checkpoint
    def one(q_i, start, k, v):  # q_i (B, H, c, d): the queries at positions start .. start+c-1
        logits = jnp.einsum("bhtd,bhsd->bhts", q_i, k) * scale  # (B, H, c, N)
        if causal:
            t = start + jnp.arange(chunk)  # (c,)
            logits = jnp.where(jnp.arange(N)[None, :] <= t[:, None], logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)  # max-subtracted inside
        return jnp.einsum("bhts,bhsv->bhtv", weights, v)  # (B, H, c, dv)

    z = jax.lax.map(lambda xs: one(xs[0], xs[1], k, v), (q_c, jnp.arange(M) * chunk))
    z = jnp.moveaxis(z, 0, 2).reshape(B, H, M * chunk, -1)  # (B, H, M·c, dv)
    return z[:, :, :N]


def exp_kernel(k, q) -> jax.Array:
    """κ(k, q) = exp(kᵀq / √d) for one key k (d,) and one query q (d,) -> scalar."""
    return jnp.exp(jnp.dot(k, q) / math.sqrt(k.shape[-1]))


def kernel_regression(q, k, v, *, causal: bool = True, kernel: Callable | None = None) -> jax.Array:
    """Nadaraya–Watson kernel regression trained on the (k, v) pairs (TTT-LM Theorem 2, E4).

    q, k: (B, H, N, d); v: (B, H, N, dv) -> z (B, H, N, dv).
    z_t = Σ_s κ(k_s, q_t) v_s / Σ_s κ(k_s, q_t) over s ≤ t (causal) or all s.
    `kernel(k, q)` takes one key (d,) and one query (d,) and returns a non-negative scalar; it is
    vmapped over all pairs. Default `exp_kernel` (exp(kᵀq/√d)), which makes this softmax attention.
    No max-subtraction: this is the literal estimator, so huge logits overflow where softmax would
    not (use it as a reference, not a fast path).
    """
    checks.check_attention_qkv(q, k, v)
    return _kernel_regression(q, k, v, causal, exp_kernel if kernel is None else kernel)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _kernel_regression(q, k, v, causal, kernel):
    pair = jax.vmap(jax.vmap(kernel, in_axes=(0, None)), in_axes=(None, 0))  # (N,d),(N,d) -> (t, s)
    kappa = jax.vmap(jax.vmap(pair))(k, q)  # (B, H, N_t, N_s)
    if causal:
        kappa = jnp.where(causal_mask(q.shape[2]), kappa, 0.0)
    numerator = jnp.einsum("bhts,bhsv->bhtv", kappa, v)  # (B, H, N, dv)
    denominator = jnp.sum(kappa, axis=-1, keepdims=True)  # (B, H, N, 1)
    return numerator / denominator
