"""Speed and memory of the sequence mixers at the 125M layer shape (`make bench`).

    python -m experiments.bench --out runs/bench [--quick] [--max-n 8192] [--mixers a,b] [--runs 5]

Every label of LABELS (a registry mixer plus overrides of its defaults) runs at width 768, 12
heads of 64, mini-batch 16, batch 1, float32, for N in 512 … 32k: forward and forward+backward time
(median of `--runs` timed calls after one warm-up, `block_until_ready`), tokens/s, compile time,
peak memory (XLA's compiled memory analysis: arguments + outputs + temporaries), FLOPs written down
from the math (the registry's `flops`, `ttt.layers.costs`) and the achieved GFLOP/s against a
matmul ceiling measured in the same run. The TTT labels run the XLA dual form (`kernel="xla"`);
the `_pallas` labels the fused Pallas kernel, on a GPU only (on a CPU it would run interpreted,
which is a correctness tool, not a speed path). Also: the baseline and TTT-Linear at batch 8
(`--batch`, N = `--batch-n`), decode latency of one step at contexts 1k/4k/16k, training memory
with and without mini-batch-group remat, the compile time of a 12- vs 24-layer LM train step
(built by the trainer's own `build_setup`), the sequence ops alone without their layers
(`experiments/bench_ops.py`: linear attention, the delta rule, each with a decay gate, and online
GD as the primal form at mini-batch 1; N up to 8k), and the small-model loop: steps/s of the MQAR
harness and demo LM configs through the trainer's setup with their real data pipelines
(`SMALL_MODELS`; what bounds every CPU-scale comparison). Writes bench.json, bench.md and
bench.png to --out; `bench_report.py` builds the tables, the target checks and the plot.

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
  by a prefill (a 16k softmax prefill would not fit in memory). A step is timed as
  `DECODE_STEPS` steps in one jitted `lax.scan` carrying the (donated) cache, the position reset
  to ctx − 1 in each, divided by their number: the cache is updated in place, as in
  `ttt.models.generate`'s loop. A lone jitted step would also copy the whole cache every call
  (a 16k softmax cache: ~60 of its ~90 ms). The timed calls of a mixer's contexts alternate, so
  the ratio of two contexts' medians (a target) is not the load of two moments of a shared
  machine (measured one context after the other, Mamba2's two identical steps once differed by
  24 %).
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

from experiments import bench_ops, bench_report, lm
from experiments.specs import load_config
from experiments.timing import compile_timed, matmul_rates, peak_bytes, timed_calls
from ttt import extensions
from ttt.data import make_dataset
from ttt.layers import MIXERS, SoftmaxAttention, costs, forward_flops, make_mixer
from ttt.models import PRESETS, build_model
from ttt.train.setup import build_setup, lower_train_step, resolve_config

WIDTH, HEADS, MINI_BATCH = 768, 12, 16  # the 125M layer shape (defaults of the flags)
NS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
DECODE_CONTEXTS = (1024, 4096, 16384)
DECODE_STEPS = 16  # decode steps per timed call
BASELINE = "linattn_chunked"

# label -> (registry name, overrides of its defaults); FLOPs come from the registry entry
LABELS: dict[str, tuple[str, dict]] = {
    "ttt_linear": ("ttt_linear", dict(stats=False, form="dual", kernel="xla")),
    "ttt_linear_pallas": ("ttt_linear", dict(stats=False, form="dual", kernel="pallas")),
    "ttt_linear_primal": ("ttt_linear", dict(stats=False, form="primal")),
    "ttt_linear_mamba": ("ttt_linear_mamba", dict(stats=False, form="dual", kernel="xla")),
    "ttt_mlp": ("ttt_mlp", dict(stats=False, form="dual", kernel="xla")),
    "ttt_mlp_pallas": ("ttt_mlp", dict(stats=False, form="dual", kernel="pallas")),
    "ttt_mlp_primal": ("ttt_mlp", dict(stats=False, form="primal")),
    "linattn_chunked": ("linear_attention", dict(form="chunked")),
    "linattn_cumsum": ("linear_attention", dict(form="cumsum")),
    "softmax": ("softmax", {}),
    "lact": ("lact", dict(chunk=2048)),  # LaCT: muon, learned momentum, window 2048, 4 fw heads
    "lact_sgd": ("lact", dict(chunk=2048, inner_opt="sgd")),  # the same with plain inner GD
    # the delta-rule family and its neighbours (online GD at mini-batch 1 is the primal form's
    # only way to run the delta rule: the row the chunked delta rule is measured against)
    "ttt_linear_primal_mb1": ("ttt_linear", dict(stats=False, form="primal", mini_batch=1)),
    "ttt_linear_gate": ("ttt_linear", dict(stats=False, form="dual", kernel="xla", gate=True)),
    "deltanet": ("deltanet", dict(chunk=64)),
    "gated_deltanet": ("gated_deltanet", dict(chunk=64)),
    # the same with DeltaNet's value width (expand_v 1): what the gate alone costs
    "gated_deltanet_v1": ("gated_deltanet", dict(chunk=64, expand_v=1)),
    "mamba2": ("mamba2", {}),
    "titans": ("titans", {}),
    "swa": ("swa", {}),  # sliding-window softmax attention, window 512
}
DECODE_LABELS = ("ttt_linear", "ttt_mlp", "linattn_chunked", "softmax", "lact", "ttt_linear_gate",
                 "deltanet", "gated_deltanet", "mamba2", "titans", "swa")
BATCH_LABELS = (BASELINE, "ttt_linear", "ttt_linear_pallas")  # the batch-8 rows
# label -> experiment spec: the configs `make demo` / `make compare` train most
SMALL_MODELS = {
    "mqar softmax (harness)": "experiments/mqar.py:softmax,harness",
    "mqar ttt_linear (harness)": "experiments/mqar.py:ttt_linear,harness",
    "lm ttt_linear (long, ctx 1k)": "experiments/lm.py:ttt_linear,long,ctx=1k",
}
GiB = 2.0**30


def flops_fwd(label: str, N: int, width: int, heads: int) -> float:
    """Forward FLOPs of one call of `label` (the registry's formula for its attributes)."""
    name, kwargs = LABELS[label]
    return forward_flops(name, N, width, heads, **kwargs)


def _quadratic(label: str) -> bool:
    """Whether the label's time and memory grow with N² (softmax attention's N×N scores)."""
    return MIXERS[LABELS[label][0]].module is SoftmaxAttention


def matmul_ceiling(runs: int) -> dict:
    """Best GFLOP/s of float32 matmuls at the projection shape and a large square one."""
    rates = matmul_rates({"proj_8192x768x768": (8192, 768, 768),
                          "square_2048": (2048, 2048, 2048)}, jnp.float32, max(runs, 5))
    out = {name: rate / 1e9 for name, rate in rates.items()}
    out["ceiling_gflops"] = max(out.values())
    return out


def est_mem_gib(label: str, N: int, width: int = WIDTH, heads: int = HEADS) -> float:
    """Rough training memory of the mixer's N-dependent intermediates (for skipping)."""
    name, kwargs = LABELS[label]
    attrs = MIXERS[name].attrs(**kwargs)
    d = width // heads
    act = 40 * N * width * 4  # projections, residuals and their gradients
    if _quadratic(label):
        return (act + 3 * heads * N * N * 4) / GiB  # scores, probabilities, their gradient
    if attrs.get("form") == "cumsum":
        return (act + 3 * heads * N * d * d * 4) / GiB  # cumulative states S_t and gradient
    if attrs.get("form") == "primal":  # one inner-parameter gradient per token, ~3 live copies
        layers = costs.inner_layers(d, attrs["learner"], attrs["mlp_factor"])
        inner = sum(din * dout for din, dout in layers)
        return (act + 3 * heads * N * inner * 4) / GiB
    return act / GiB


def gpu_only(label: str) -> str | None:
    """Why `label` does not run on this backend (the Pallas kernel runs compiled on a GPU only)."""
    if LABELS[label][1].get("kernel") == "pallas" and jax.default_backend() != "gpu":
        return "Pallas kernel: GPU only (a CPU would run it interpreted)"
    return None


def _setup(label: str, N: int, width: int, heads: int, batch: int = 1, **overrides):
    name, kwargs = LABELS[label]
    module = make_mixer(name, width, heads, **{**kwargs, **overrides})
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, N, width), jnp.float32)
    params = module.init(jax.random.PRNGKey(1), x[:1, : min(N, 2 * MINI_BATCH)])
    ct = jax.random.normal(jax.random.PRNGKey(2), (batch, N, width), jnp.float32)
    return module, params, x, ct


def measure_layer(label: str, N: int, runs: int, width: int = WIDTH, heads: int = HEADS,
                  batch: int = 1, **overrides) -> dict:
    """Forward and forward+backward time, compile time and peak memory of one mixer at N."""
    module, params, x, ct = _setup(label, N, width, heads, batch, **overrides)

    def forward(p, x):
        return module.apply(p, x)[0]

    def train(p, x, ct):  # the backward of a fixed random cotangent (no loss to reduce)
        y, pullback = jax.vjp(forward, p, x)
        return pullback(ct.astype(y.dtype))

    fwd, fwd_compile = compile_timed(jax.jit(forward), params, x)
    fb, fb_compile = compile_timed(jax.jit(train), params, x, ct)
    fwd_t = timed_calls(fwd, params, x, runs=runs)
    fb_t = timed_calls(fb, params, x, ct, runs=runs)
    return {
        "fwd_s": statistics.median(fwd_t), "fb_s": statistics.median(fb_t),
        "fwd_runs": fwd_t, "fb_runs": fb_t,
        "fwd_compile_s": fwd_compile, "fb_compile_s": fb_compile,
        "fwd_peak_bytes": peak_bytes(fwd), "fb_peak_bytes": peak_bytes(fb),
    }


def sweep(labels, ns, runs: int, max_mem_gib: float, case_budget: float, log,
          width: int = WIDTH, heads: int = HEADS) -> list[dict]:
    """measure_layer over labels × ns with the memory and time skips of the module docstring."""
    rows = []
    for label in labels:
        prev = None  # (N, seconds for one fwd + one fwd+bwd call)
        oom = None  # the N at which this mixer ran out of memory
        for N in ns:
            row = {"mixer": label, "N": N, "flops_fwd": flops_fwd(label, N, width, heads)}
            row["flops_fb"] = None if row["flops_fwd"] is None else 3 * row["flops_fwd"]
            mem = est_mem_gib(label, N, width, heads)
            power = 2 if _quadratic(label) else 1
            est = prev[1] * (N / prev[0]) ** power * (runs + 1) if prev else 0.0
            if gpu_only(label):
                row["skipped"] = gpu_only(label)
            elif oom is not None:
                row["skipped"] = f"out of memory at N={oom}"
            elif mem > max_mem_gib:
                row["skipped"] = f"estimated memory {mem:.1f} GiB > {max_mem_gib:g} GiB"
            elif est > case_budget:
                row["skipped"] = f"estimated time {est:.0f} s > budget {case_budget:g} s"
            else:
                try:
                    row.update(measure_layer(label, N, runs, width=width, heads=heads))
                    prev = (N, row["fwd_s"] + row["fb_s"])
                except Exception as e:  # out of memory, typically: keep the rest of the run
                    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e):
                        raise
                    row["skipped"] = "out of memory: " + str(e).split("\n")[0][:120]
                    oom = N  # larger N of this mixer would fail too
            log(bench_report.row_line(row))
            rows.append(row)
    return rows


def measure_batch(labels, N: int, batch: int, runs: int, log, width: int = WIDTH,
                  heads: int = HEADS) -> list[dict]:
    """Each label at `batch` sequences of N tokens (per-device training batches are > 1)."""
    rows = []
    for label in labels:
        row = {"mixer": label, "N": N, "batch": batch,
               "flops_fwd": batch * flops_fwd(label, N, width, heads)}
        row["flops_fb"] = 3 * row["flops_fwd"]
        if gpu_only(label):
            row["skipped"] = gpu_only(label)
        else:
            row.update(measure_layer(label, N, runs, width=width, heads=heads, batch=batch))
        log(f"batch {batch}: " + bench_report.row_line(row))
        rows.append(row)
    return rows


def _decode_call(label: str, ctx: int, width: int, heads: int):
    """A compiled call of DECODE_STEPS decode steps at position ctx − 1 on a full cache (see
    module docstring): () -> seconds per step of one call, the cache carried in place."""
    name, _ = LABELS[label]
    overrides = {"cache_size": ctx} if "cache_size" in MIXERS[name].accepted() else {}
    module, params, x, _ = _setup(label, 2 * MINI_BATCH, width, heads, **overrides)
    cache = module.apply(params, 1, method=module.init_cache)
    key = jax.random.PRNGKey(3)
    cache = {k: (jax.random.normal(key, v.shape, v.dtype) * 0.1
                 if k in ("k", "v") else v) for k, v in cache.items()}  # a full KV cache
    # distinct buffers: a cache may hold one array twice (two zero states), which donation refuses
    cache = jax.tree.map(lambda a: jnp.array(a, copy=True), cache)
    has_pos = "pos" in cache  # caches without a position hold a state of constant size
    if has_pos:
        cache["pos"] = jnp.asarray(ctx - 1, jnp.int32)
    x_t = x[:, :1]

    def at_ctx(c):
        return dict(c, pos=jnp.asarray(ctx - 1, jnp.int32)) if has_pos else c

    def steps(p, x_t, c):  # DECODE_STEPS steps at position ctx − 1, the cache carried in place
        def body(c, _):
            y, c = module.apply(p, x_t, at_ctx(c), method=module.step)
            return c, y
        c, ys = jax.lax.scan(body, c, None, length=DECODE_STEPS)
        return ys, c

    run = jax.jit(steps, donate_argnums=2)
    state = {"cache": cache}

    def call() -> float:
        t0 = time.perf_counter()
        ys, state["cache"] = run(params, x_t, state["cache"])
        jax.block_until_ready((ys, state["cache"]))
        return (time.perf_counter() - t0) / DECODE_STEPS

    call()  # warm-up (compiles)
    return call


def measure_decode_contexts(label: str, contexts, runs: int, width: int = WIDTH,
                            heads: int = HEADS) -> list[dict]:
    """Latency of one decode step at each context (median of `runs` timed calls), the calls of
    the contexts interleaved so that a change in the machine's load falls on all of them alike
    (their ratio is a target)."""
    calls = {ctx: _decode_call(label, ctx, width, heads) for ctx in contexts}
    times = {ctx: [] for ctx in contexts}
    for _ in range(runs):
        for ctx in contexts:
            times[ctx].append(calls[ctx]())
    name = LABELS[label][0]
    chunk = MIXERS[name].attrs(**LABELS[label][1]).get("chunk") if name == "lact" else None
    return [{"mixer": label, "context": ctx, "step_s": statistics.median(times[ctx]),
             "runs": times[ctx], "closes_chunk": bool(chunk) and ctx % chunk == 0}  # the update
            for ctx in contexts]  # runs in this step


def measure_decode(label: str, ctx: int, runs: int, width: int = WIDTH,
                   heads: int = HEADS) -> dict:
    """Latency of one decode step on a cache at position ctx − 1 (see module docstring)."""
    return measure_decode_contexts(label, [ctx], runs, width, heads)[0]


def measure_remat(N: int, runs: int, group: int, width: int = WIDTH,
                  heads: int = HEADS) -> list[dict]:
    """TTT-Linear fwd+bwd with and without mini-batch-group remat (memory and time)."""
    rows = []
    for every in (0, group):
        r = measure_layer("ttt_linear", N, runs, width=width, heads=heads, remat_every=every)
        rows.append({"N": N, "remat_every": every, **r})
    return rows


def lm_train_setup(mixer: str, mixer_kwargs: dict, preset: str, seq_len: int, batch: int, *,
                   dtype: str = "float32", remat: str = "none", num_layers: int | None = None):
    """The trainer's own Setup (`ttt.train.build_setup`: model, the paper's AdamW recipe,
    single-device placement, pure train step) for an LM of `preset` with a registry mixer."""
    config = lm.get_config(f"{mixer},{preset}")
    with config.unlocked():
        config.model.mixer_kwargs = mixer_kwargs  # replaces the recipe's, not merged into them
        config.model.update(dtype=dtype, remat=remat, scan_layers=True)
        if num_layers is not None:
            config.model.num_layers = num_layers
        config.data.seq_len = seq_len
        config.train.update(global_batch_size=batch, grad_accum=1, parallel="single")
    meta = {"vocab_size": PRESETS["lm"][preset]["vocab_size"], "seq_len": seq_len}
    return build_setup(resolve_config(config, meta), meta, build_model)


def measure_small_model(spec: str, steps: int) -> dict:
    """Steps/s of the training loop of an experiment config: its real data pipeline, the
    trainer's setup and placement, jit-compiled once; `steps` timed iterations (next batch,
    placement, step) after two warm-up ones. Also the CPU seconds per step of this process
    (every thread), which machine load disturbs less than wall time."""
    config = load_config(spec)
    data = make_dataset(config.data, "train", config.train.global_batch_size, seed=0)
    config = resolve_config(config, data.meta)
    setup = build_setup(config, data.meta, build_model)
    placement = setup.placement
    it = data.iterator()
    batch = placement.place_batch(next(it))
    state = placement.place_state(setup.create_state)
    compiled, compile_s = compile_timed(placement.compile_train(setup.train_step), state, batch)
    for _ in range(2):
        state, _ = compiled(state, placement.place_batch(next(it)))
    jax.block_until_ready(state)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        state, metrics = compiled(state, placement.place_batch(next(it)))
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"spec": spec, "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "batch": config.train.global_batch_size, "seq_len": data.meta["seq_len"],
            "steps": steps, "steps_per_s": steps / wall, "cpu_s_per_step": cpu / steps,
            "tokens_per_s": steps * setup.items_per_step / wall, "compile_s": compile_s,
            "loss": float(metrics["loss"])}


def measure_lm_compile(layers_list=(12, 24), preset: str = "125m", seq_len: int = 256,
                       repeats: int = 1) -> list[dict]:
    """Compile time of a TTT-Linear LM train step (scan_layers=True) per depth (best of repeats):
    the trainer's step lowered on abstract state and batch (nothing allocated), then compiled."""
    rows = []
    for layers in layers_list:
        best = None
        for _ in range(repeats):
            setup = lm_train_setup("ttt_linear", {}, preset, seq_len, 1, num_layers=layers)
            t0 = time.perf_counter()
            lower_train_step(setup).compile()
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
        rows.append({"layers": layers, "seq_len": seq_len, "compile_s": best})
    return rows


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else what `platform` knows), for the run's record."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    """Parse the flags, run every measurement, write bench.json / bench.md / bench.png."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--quick", action="store_true", help="N <= 2048 and 3 runs")
    parser.add_argument("--max-n", type=int, default=None)
    parser.add_argument("--mixers", default=",".join(LABELS),
                        help=f"comma-separated subset of {', '.join(LABELS)}")
    parser.add_argument("--import", dest="imports", default=None,
                        help="comma-separated .py files or modules registering mixers to bench "
                             "(docs/extending.md)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls (default 5, quick 3)")
    parser.add_argument("--max-mem-gib", type=float, default=12.0)
    parser.add_argument("--case-budget", type=float, default=90.0,
                        help="skip a shape whose estimated time for all its calls exceeds this")
    parser.add_argument("--skip", default="",
                        help="comma-separated: ops,batch,decode,remat,lm_compile,small")
    parser.add_argument("--batch", type=int, default=8, help="batch of the batch rows")
    parser.add_argument("--batch-n", type=int, default=1024, help="N of the batch rows")
    parser.add_argument("--small-spec", action="append", default=[],
                        help="an experiment spec of a small-model row, repeatable (default: "
                             "SMALL_MODELS)")
    parser.add_argument("--small-steps", type=int, default=None, help="default 10 quick, 30")
    parser.add_argument("--ns", default=None, help="comma-separated sequence lengths (overrides "
                        "the default list; --max-n and --quick still cap it)")
    parser.add_argument("--decode-contexts", default=",".join(map(str, DECODE_CONTEXTS)))
    parser.add_argument("--lm-seq-len", type=int, default=None, help="default 256 quick, 2048")
    parser.add_argument("--lm-repeats", type=int, default=None, help="default 1 quick, 2")
    parser.add_argument("--width", type=int, default=WIDTH, help="smoke runs only (default 768)")
    parser.add_argument("--heads", type=int, default=HEADS, help="smoke runs only (default 12)")
    parser.add_argument("--lm-preset", default="125m", help="smoke runs only")
    args = parser.parse_args(argv)

    extensions.load(args.imports)  # your own mixers, benchmarked by their registry name
    labels = [m.strip() for m in args.mixers.split(",") if m.strip()]
    for label in labels:  # a registry name that is no label runs with its registry defaults
        if label not in LABELS and label in MIXERS:
            LABELS[label] = (label, {})
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        parser.error(f"unknown mixers {unknown}; known: {', '.join(LABELS)} (or any registry "
                     "name)")
    if BASELINE not in labels:
        labels.insert(0, BASELINE)  # every ratio needs the baseline from the same run
    runs = args.runs or (3 if args.quick else 5)
    max_n = min(args.max_n or NS[-1], 2048 if args.quick else NS[-1])
    ns = [int(n) for n in args.ns.split(",")] if args.ns else list(NS)
    ns = [n for n in ns if n <= max_n]
    contexts = [int(c) for c in args.decode_contexts.split(",") if c]
    shape = dict(width=args.width, heads=args.heads)  # the layer shape (smoke runs shrink it)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    os.makedirs(args.out, exist_ok=True)
    log = functools.partial(print, flush=True)

    started = time.time()
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m experiments.bench " + " ".join(argv or __import__("sys").argv[1:]),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(),
                    "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]},
        "shape": {"width": args.width, "heads": args.heads, "head_dim": args.width // args.heads,
                  "mini_batch": MINI_BATCH, "batch": 1, "dtype": "float32"},
        "runs": runs, "baseline": BASELINE,
    }
    log("matmul ceiling ...")
    result["ceiling_start"] = matmul_ceiling(runs)
    log(json.dumps(result["ceiling_start"]))
    result["layers"] = sweep(labels, ns, runs, args.max_mem_gib, args.case_budget, log, **shape)
    if "ops" not in skip:
        result["ops"] = bench_ops.sweep_ops(bench_ops.OPS, ns, runs, log, args.heads,
                                            args.width // args.heads)
    if "batch" not in skip:
        result["batch"] = measure_batch([m for m in BATCH_LABELS if m in labels], args.batch_n,
                                        args.batch, runs, log, **shape)
    if "decode" not in skip:
        result["decode"] = []
        for label in [m for m in DECODE_LABELS if m in labels]:
            for row in measure_decode_contexts(label, contexts, max(runs, 20), **shape):
                result["decode"].append(row)
                log(f"decode {label} ctx={row['context']}: {row['step_s'] * 1e3:.3f} ms")
    if "remat" not in skip and "ttt_linear" in labels:
        remat_n = 8192 if max(ns) >= 8192 else max(ns)
        result["remat"] = measure_remat(remat_n, runs, group=16, **shape)
        log(json.dumps([{k: r[k] for k in ("N", "remat_every", "fb_s", "fb_peak_bytes")}
                        for r in result["remat"]]))
    if "lm_compile" not in skip:
        result["lm_compile"] = measure_lm_compile(
            preset=args.lm_preset, seq_len=args.lm_seq_len or (256 if args.quick else 2048),
            repeats=args.lm_repeats or (1 if args.quick else 2))
        log(json.dumps(result["lm_compile"]))
    if "small" not in skip:
        specs = {s: s for s in args.small_spec} if args.small_spec else SMALL_MODELS
        result["small"] = []
        for label, spec in specs.items():
            row = {"label": label, **measure_small_model(
                spec, args.small_steps or (10 if args.quick else 30))}
            result["small"].append(row)
            log(f"small model {label}: {row['steps_per_s']:.1f} steps/s, "
                f"{row['cpu_s_per_step'] * 1e3:.0f} ms CPU per step")
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
