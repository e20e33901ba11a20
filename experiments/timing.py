"""Timing helpers shared by the benchmarks (`bench.py`, `bench_train.py`)."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def timed_calls(fn, *args, runs: int) -> list[float]:
    """Seconds of `runs` calls of fn(*args) after one warm-up call (`block_until_ready`)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def compile_timed(jitted, *args):
    """Lower and compile a jitted function for args -> (compiled, seconds for trace + lower +
    compile)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable (None if XLA does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # backends without memory analysis
        return None


def matmul_rates(shapes: dict[str, tuple[int, int, int]], dtype, runs: int) -> dict[str, float]:
    """name -> FLOP/s of a jitted (m, k) @ (k, n) matmul in `dtype` (median of `runs` calls)."""
    out = {}
    for name, (m, k, n) in shapes.items():
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32).astype(dtype)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32).astype(dtype)
        seconds = statistics.median(timed_calls(jax.jit(jnp.matmul), a, b, runs=runs))
        out[name] = 2.0 * m * k * n / seconds
    return out
