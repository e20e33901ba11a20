"""The sequence ops alone, without the layers around them (`make bench`'s "ops" rows).

A layer's time is its projections (large matmuls, near the matmul ceiling) plus its op (many small
per-chunk products, far from it) plus convolutions and norms; the layer ratios of the bench mix
all three. These rows time the op by itself at the bench's head shape, per head (B, H, N, d) =
(1, heads, N, width / heads), forward+backward (a fixed random cotangent on the output, the
gradient w.r.t. every input), with the FLOPs of the algorithm the op runs (`ttt.layers.costs`):

    linear_attention        chunked causal linear attention (chunk 64), the layers' baseline
    linear_attention_gated  the same with a per-token decay (Mamba2's SSD core)
    delta_rule              the chunked delta rule (chunk 64; DeltaNet's op)
    delta_rule_gated        the same with a per-token decay (Gated DeltaNet's op)
    ttt_primal_mb1          online GD as the TTT primal form at mini-batch 1 with a bias-free
                            linear learner: the delta rule token by token (the identity tests
                            hold the two equal)

Inputs: q ~ N(0, 1/d), k L2-normalised per token, v ~ N(0, 1), β = sigmoid(N(0, 1)), and for the
gated ops log a = −softplus(N(0, 1)) / 16 (a in about (0.95, 1)).
"""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp

from experiments.timing import compile_timed, timed_calls
from ttt.layers import costs
from ttt.ops import delta, linear_attn
from ttt.ops.learners import linear
from ttt.ops.ttt import ttt_primal

OPS = ("linear_attention", "linear_attention_gated", "delta_rule", "delta_rule_gated",
       "ttt_primal_mb1")
CHUNK = 64
# the longest N the ops run at: the targets read 2k and 8k, and online GD at mini-batch 1 keeps
# every token's state for its backward (GiBs beyond 8k)
MAX_N = 8192


def _call(op: str, d: int):
    """op -> f(q, k, v, beta, log_a) -> o (B, H, N, d)."""
    if op.startswith("linear_attention"):
        gated = op.endswith("gated")
        return lambda q, k, v, b, la: linear_attn.linear_attention(
            q, k, v, form="chunked", chunk=CHUNK, log_alpha=la if gated else None)
    if op.startswith("delta_rule"):
        gated = op.endswith("gated")
        return lambda q, k, v, b, la: delta.delta_rule(
            q, k, v, b, log_alpha=la if gated else None, chunk=CHUNK)[0]
    if op == "ttt_primal_mb1":
        learner = linear(d_out=d, bias=False)
        return lambda q, k, v, b, la: ttt_primal(
            learner, {"W1": jnp.zeros((q.shape[1], d, d), q.dtype)}, q, k, v, b,
            mini_batch=1)[0]
    raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")


def op_flops(op: str, N: int, heads: int, d: int) -> float:
    """Forward FLOPs of one call over all heads."""
    if op.startswith("linear_attention"):
        return heads * costs.linear_core(N, d, "chunked", CHUNK)
    if op.startswith("delta_rule"):
        return heads * costs.delta_core(N, d, d, "chunked", CHUNK)
    return costs.ttt_core(N, heads, 1, [(d, d)], "primal")


def _inputs(N: int, heads: int, d: int):
    kq, kk, kv, kb, ka, kc = jax.random.split(jax.random.PRNGKey(0), 6)
    shape = (1, heads, N, d)
    k = jax.random.normal(kk, shape)
    args = (jax.random.normal(kq, shape) / math.sqrt(d),
            k / jnp.linalg.norm(k, axis=-1, keepdims=True),
            jax.random.normal(kv, shape),
            jax.nn.sigmoid(jax.random.normal(kb, shape[:3])),
            -jax.nn.softplus(jax.random.normal(ka, shape[:3])) / 16)
    return args, jax.random.normal(kc, shape)


def measure_op(op: str, N: int, runs: int, heads: int, d: int) -> dict:
    """fwd+bwd seconds (median of `runs`), compile seconds and FLOPs of one op at N."""
    f = _call(op, d)
    args, ct = _inputs(N, heads, d)

    def train(args, ct):
        _, pullback = jax.vjp(f, *args)
        return pullback(ct)

    fb, compile_s = compile_timed(jax.jit(train), args, ct)
    times = timed_calls(fb, args, ct, runs=runs)
    flops = op_flops(op, N, heads, d)
    return {"op": op, "N": N, "heads": heads, "head_dim": d, "fb_s": statistics.median(times),
            "fb_runs": times, "fb_compile_s": compile_s, "flops_fwd": flops,
            "flops_fb": 3 * flops}


def sweep_ops(ops, ns, runs: int, log, heads: int, d: int) -> list[dict]:
    """measure_op over ops × the ns up to MAX_N, one log line each."""
    rows = []
    for op in ops:
        for N in [n for n in ns if n <= MAX_N]:
            row = measure_op(op, N, runs, heads, d)
            log(f"{'op ' + op:>26} N={N:>6}  fwd+bwd {row['fb_s'] * 1e3:9.1f} ms")
            rows.append(row)
    return rows
