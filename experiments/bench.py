"""Speed and memory of the sequence mixers at the 125M layer shape (`make bench`).

    python -m experiments.bench --out runs/bench [--quick] [--max-n 8192] [--mixers a,b] [--runs 5]

Every mixer of MIXERS runs at width 768, 12 heads of 64, mini-batch 16, batch 1, float32, for
N in 512 … 32k: forward and forward+backward time (median of `--runs` timed calls after one
warm-up, `block_until_ready`), tokens/s, compile time, peak memory (XLA's compiled memory analysis:
arguments + outputs + temporaries), FLOPs written down from the math (`bench_flops.py`) and the
achieved GFLOP/s against a matmul ceiling measured in the same run. Also: decode latency of one
step at contexts 1k/4k/16k, training memory with and without mini-batch-group remat, and the
compile time of a 12- vs 24-layer LM train step. Writes bench.json, bench.md and bench.png to
--out; `bench_report.py` builds the tables, the target checks and the plot.

Notable choices:
- The baseline of every ratio is causal linear attention in chunked form with the same four
  projections, measured in the same process, so machine load affects both sides alike.
- The TTT mixers run with `stats=False`: the inner-loss diagnostics cost an extra inner pass that a
  training step can skip; the benchmark measures the layer itself.
- A shape is skipped, and the table says why, when its estimated memory exceeds --max-mem-gib, or
  when its estimated time (the previous N's time scaled by N, or N² for softmax) exceeds
  --case-budget seconds for all its calls.
- Decode steps run on a cache at position ctx − 1 (so the softmax KV cache holds ctx tokens); the
  cost of one step does not depend on the values held, so the cache is built directly instead of
  by a prefill (a 16k softmax prefill would not fit in memory).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_flops, bench_report
from ttt.layers.registry import make_mixer

WIDTH, HEADS, MINI_BATCH = 768, 12, 16
NS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
DECODE_CONTEXTS = (1024, 4096, 16384)
BASELINE = "linattn_chunked"

# label -> (registry name, mixer kwargs, FLOP spec for bench_flops.mixer_flops)
MIXERS: dict[str, tuple[str, dict, dict]] = {
    "ttt_linear": ("ttt_linear", dict(stats=False, form="dual"),
                   dict(family="ttt", learner="linear", form="dual")),
    "ttt_linear_primal": ("ttt_linear", dict(stats=False, form="primal"),
                          dict(family="ttt", learner="linear", form="primal")),
    "ttt_linear_mamba": ("ttt_linear_mamba", dict(stats=False, form="dual"),
                         dict(family="ttt", learner="linear", form="dual", backbone="mamba")),
    "ttt_mlp": ("ttt_mlp", dict(stats=False, form="dual"),
                dict(family="ttt", learner="mlp", form="dual")),
    "ttt_mlp_primal": ("ttt_mlp", dict(stats=False, form="primal"),
                       dict(family="ttt", learner="mlp", form="primal")),
    "linattn_chunked": ("linear_attention", dict(form="chunked"),
                        dict(family="linear_attention", form="chunked", chunk=64)),
    "linattn_cumsum": ("linear_attention", dict(form="cumsum"),
                       dict(family="linear_attention", form="cumsum")),
    "softmax": ("softmax", {}, dict(family="softmax")),
}
DECODE_MIXERS = ("ttt_linear", "ttt_mlp", "linattn_chunked", "softmax")
GiB = 2.0**30


def _median_time(fn, *args, runs: int) -> list[float]:
    """Seconds of `runs` calls of fn(*args) after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return times


def _compile(fn, *args):
    """jit-compile fn for args -> (compiled, seconds for trace + lower + compile)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable (None if XLA does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # backends without memory analysis
        return None


def matmul_ceiling(runs: int) -> dict:
    """Best GFLOP/s of float32 matmuls at the projection shape and a large square one."""
    out = {}
    for name, (m, k, n) in {"proj_8192x768x768": (8192, 768, 768),
                            "square_2048": (2048, 2048, 2048)}.items():
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        t = statistics.median(_median_time(f, a, b, runs=max(runs, 5)))
        out[name] = 2.0 * m * k * n / t / 1e9
    out["ceiling_gflops"] = max(out.values())
    return out


def est_mem_gib(label: str, N: int) -> float:
    """Rough training memory of the mixer's N-dependent intermediates (for skipping)."""
    d = WIDTH // HEADS
    act = 40 * N * WIDTH * 4  # projections, residuals and their gradients
    if label == "softmax":
        return (act + 3 * HEADS * N * N * 4) / GiB  # scores, probabilities, their gradient
    if label == "linattn_cumsum":
        return (act + 3 * HEADS * N * d * d * 4) / GiB  # cumulative states S_t and gradient
    if label.endswith("_primal"):  # one inner-parameter gradient per token, ~3 live copies
        inner = d * d if MIXERS[label][2]["learner"] == "linear" else 2 * 4 * d * d
        return (act + 3 * HEADS * N * inner * 4) / GiB
    return act / GiB


def _setup(label: str, N: int, **overrides):
    name, kwargs, _ = MIXERS[label]
    module = make_mixer(name, WIDTH, HEADS, **{**kwargs, **overrides})
    x = jax.random.normal(jax.random.PRNGKey(0), (1, N, WIDTH), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x[:, : min(N, 2 * MINI_BATCH)])
    ct = jax.random.normal(jax.random.PRNGKey(2), (1, N, WIDTH), jnp.float32)
    return module, params, x, ct


def measure_layer(label: str, N: int, runs: int, **overrides) -> dict:
    """Forward and forward+backward time, compile time and peak memory of one mixer at N."""
    module, params, x, ct = _setup(label, N, **overrides)

    def forward(p, x):
        return module.apply(p, x)[0]

    def loss(p, x, ct):
        return jnp.sum(forward(p, x) * ct)  # a fixed random cotangent for the backward

    train = jax.value_and_grad(loss, argnums=(0, 1))
    fwd, fwd_compile = _compile(forward, params, x)
    fb, fb_compile = _compile(train, params, x, ct)
    fwd_t = _median_time(fwd, params, x, runs=runs)
    fb_t = _median_time(fb, params, x, ct, runs=runs)
    return {
        "fwd_s": statistics.median(fwd_t), "fb_s": statistics.median(fb_t),
        "fwd_runs": fwd_t, "fb_runs": fb_t,
        "fwd_compile_s": fwd_compile, "fb_compile_s": fb_compile,
        "fwd_peak_bytes": _peak_bytes(fwd), "fb_peak_bytes": _peak_bytes(fb),
    }


def sweep(labels, ns, runs: int, max_mem_gib: float, case_budget: float, log) -> list[dict]:
    """measure_layer over labels × ns with the memory and time skips of the module docstring."""
    rows = []
    for label in labels:
        spec = MIXERS[label][2]
        prev = None  # (N, seconds for one fwd + one fwd+bwd call)
        oom = None  # the N at which this mixer ran out of memory
        for N in ns:
            row = {"mixer": label, "N": N,
                   "flops_fwd": bench_flops.mixer_flops(spec, N, WIDTH, HEADS)}
            row["flops_fb"] = 3 * row["flops_fwd"]
            mem = est_mem_gib(label, N)
            power = 2 if label == "softmax" else 1
            est = prev[1] * (N / prev[0]) ** power * (runs + 1) if prev else 0.0
            if oom is not None:
                row["skipped"] = f"out of memory at N={oom}"
            elif mem > max_mem_gib:
                row["skipped"] = f"estimated memory {mem:.1f} GiB > {max_mem_gib:g} GiB"
            elif est > case_budget:
                row["skipped"] = f"estimated time {est:.0f} s > budget {case_budget:g} s"
            else:
                try:
                    row.update(measure_layer(label, N, runs))
                    prev = (N, row["fwd_s"] + row["fb_s"])
                except Exception as e:  # out of memory, typically: keep the rest of the run
                    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e):
                        raise
                    row["skipped"] = "out of memory: " + str(e).split("\n")[0][:120]
                    oom = N  # larger N of this mixer would fail too
            log(bench_report.row_line(row))
            rows.append(row)
    return rows


def measure_decode(label: str, ctx: int, runs: int) -> dict:
    """Latency of one decode step on a cache at position ctx − 1 (see module docstring)."""
    overrides = {"cache_size": ctx} if label == "softmax" else {}
    module, params, x, _ = _setup(label, 2 * MINI_BATCH, **overrides)
    cache = module.apply(params, 1, method=module.init_cache)
    key = jax.random.PRNGKey(3)
    cache = {k: (jax.random.normal(key, v.shape, v.dtype) * 0.1
                 if k in ("k", "v") else v) for k, v in cache.items()}
    cache["pos"] = jnp.asarray(ctx - 1, jnp.int32)
    x_t = x[:, :1]
    step = jax.jit(lambda p, x_t, c: module.apply(p, x_t, c, method=module.step))
    times = _median_time(step, params, x_t, cache, runs=runs)
    return {"mixer": label, "context": ctx, "step_s": statistics.median(times), "runs": times}


def measure_remat(N: int, runs: int, group: int) -> list[dict]:
    """TTT-Linear fwd+bwd with and without mini-batch-group remat (memory and time)."""
    rows = []
    for every in (0, group):
        r = measure_layer("ttt_linear", N, runs, remat_every=every)
        rows.append({"N": N, "remat_every": every, **r})
    return rows


def measure_lm_compile(layers_list=(12, 24), preset: str = "125m", seq_len: int = 256,
                       repeats: int = 1) -> list[dict]:
    """Compile time of a TTT-Linear LM train step (scan_layers=True) per depth (best of repeats)."""
    import optax

    from ttt.models.build import build_model
    from ttt.train.steps import Task, TrainState, train_step

    rows = []
    for layers in layers_list:
        best = None
        for _ in range(repeats):
            model = build_model({"kind": "lm", "preset": preset, "mixer": "ttt_linear",
                                 "num_layers": layers, "scan_layers": True})
            task = Task("lm", model)
            tx = optax.adamw(1e-3)
            tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
            batch = {"inputs": tokens, "targets": tokens,
                     "mask": jax.ShapeDtypeStruct((1, seq_len), jnp.float32)}
            params = jax.eval_shape(task.init, jax.random.PRNGKey(0),
                                    {"inputs": jnp.zeros((1, seq_len), jnp.int32)})
            state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(tx.init, params),
                               rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
            step = functools.partial(train_step, task=task, tx=tx, lr_fn=lambda s: 1e-3,
                                     ttt_lr_fn=lambda s: 1.0)
            _, seconds = _compile(step, state, batch)
            best = seconds if best is None else min(best, seconds)
        rows.append({"layers": layers, "seq_len": seq_len, "compile_s": best})
    return rows


def main(argv=None):
    """Parse the flags, run every measurement, write bench.json / bench.md / bench.png."""
    global WIDTH, HEADS  # the layer shape; changed only by the smoke flags --width/--heads
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--quick", action="store_true", help="N <= 2048 and 3 runs")
    parser.add_argument("--max-n", type=int, default=None)
    parser.add_argument("--mixers", default=",".join(MIXERS),
                        help=f"comma-separated subset of {', '.join(MIXERS)}")
    parser.add_argument("--runs", type=int, default=None, help="timed calls (default 5, quick 3)")
    parser.add_argument("--max-mem-gib", type=float, default=12.0)
    parser.add_argument("--case-budget", type=float, default=90.0,
                        help="skip a shape whose estimated time for all its calls exceeds this")
    parser.add_argument("--skip", default="", help="comma-separated: decode,remat,lm_compile")
    parser.add_argument("--ns", default=None, help="comma-separated sequence lengths (overrides "
                        "the default list; --max-n and --quick still cap it)")
    parser.add_argument("--decode-contexts", default=",".join(map(str, DECODE_CONTEXTS)))
    parser.add_argument("--lm-seq-len", type=int, default=None, help="default 256 quick, 2048")
    parser.add_argument("--lm-repeats", type=int, default=None, help="default 1 quick, 2")
    parser.add_argument("--width", type=int, default=WIDTH, help="smoke runs only (default 768)")
    parser.add_argument("--heads", type=int, default=HEADS, help="smoke runs only (default 12)")
    parser.add_argument("--lm-preset", default="125m", help="smoke runs only")
    args = parser.parse_args(argv)

    labels = [m.strip() for m in args.mixers.split(",") if m.strip()]
    unknown = sorted(set(labels) - set(MIXERS))
    if unknown:
        parser.error(f"unknown mixers {unknown}; known: {', '.join(MIXERS)}")
    if BASELINE not in labels:
        labels.insert(0, BASELINE)  # every ratio needs the baseline from the same run
    runs = args.runs or (3 if args.quick else 5)
    max_n = min(args.max_n or NS[-1], 2048 if args.quick else NS[-1])
    ns = [int(n) for n in args.ns.split(",")] if args.ns else list(NS)
    ns = [n for n in ns if n <= max_n]
    contexts = [int(c) for c in args.decode_contexts.split(",") if c]
    WIDTH, HEADS = args.width, args.heads
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.makedirs(args.out, exist_ok=True)
    log = functools.partial(print, flush=True)

    started = time.time()
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m experiments.bench " + " ".join(argv or __import__("sys").argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "shape": {"width": args.width, "heads": args.heads, "head_dim": args.width // args.heads,
                  "mini_batch": MINI_BATCH, "batch": 1, "dtype": "float32"},
        "runs": runs, "baseline": BASELINE,
    }
    log("matmul ceiling ...")
    result["ceiling_start"] = matmul_ceiling(runs)
    log(json.dumps(result["ceiling_start"]))
    result["layers"] = sweep(labels, ns, runs, args.max_mem_gib, args.case_budget, log)
    if "decode" not in skip:
        result["decode"] = []
        for label in [m for m in DECODE_MIXERS if m in labels]:
            for ctx in contexts:
                result["decode"].append(measure_decode(label, ctx, max(runs, 20)))
                log(f"decode {label} ctx={ctx}: {result['decode'][-1]['step_s'] * 1e3:.3f} ms")
    if "remat" not in skip and "ttt_linear" in labels:
        remat_n = 8192 if max(ns) >= 8192 else max(ns)
        result["remat"] = measure_remat(remat_n, runs, group=16)
        log(json.dumps([{k: r[k] for k in ("N", "remat_every", "fb_s", "fb_peak_bytes")}
                        for r in result["remat"]]))
    if "lm_compile" not in skip:
        result["lm_compile"] = measure_lm_compile(
            preset=args.lm_preset, seq_len=args.lm_seq_len or (256 if args.quick else 2048),
            repeats=args.lm_repeats or (1 if args.quick else 2))
        log(json.dumps(result["lm_compile"]))
    result["ceiling_end"] = matmul_ceiling(runs)
    result["ceiling_gflops"] = max(result["ceiling_start"]["ceiling_gflops"],
                                   result["ceiling_end"]["ceiling_gflops"])
    result["wall_s"] = time.time() - started
    bench_report.finish(result)  # derived columns + target checks, in place
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    md = bench_report.markdown(result)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(md)
    bench_report.plot(result, os.path.join(args.out, "bench.png"))
    log(md)
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
