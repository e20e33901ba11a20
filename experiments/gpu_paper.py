"""The TTT-LM paper's 125M configs on one accelerator: tokens/s, MFU and peak memory of 20 steps.

    python -m experiments.gpu_paper --out docs/gpu [--mixers ttt_linear,ttt_mlp,softmax]
        [--preset 125m] [--ctx 2048] [--batch 16] [--steps 20] [--peak-tflops 989]

For each mixer: the paper recipe of `experiments/lm.py` (`<mixer>,<preset>,ctx=<ctx>,paper`:
bfloat16 compute, rematerialised blocks, the paper's AdamW) at batch `--batch` x `--ctx` on one
device (parallel=single), on random tokens (the Pile is not needed to time a step). The trainer's
own default train step (`ttt.train.build_setup`, the plain step without the diagnostics pass) is
compiled once and run `--steps` times from a fresh initialisation; every step is timed with
`block_until_ready`, and tokens/s is taken from the median step after the first two.

Written to OUT/gpu_paper_<preset>_<ctx>.json and .md: per mixer the step time, tokens/s, model
FLOPs per step (as `experiments.bench_train`: 3 x the forward FLOPs of mixers, SwiGLU and head),
MFU against the measured bf16 matmul peak (or --peak-tflops), XLA's compiled memory footprint,
the device's peak bytes in use (`memory_stats()`, absent on a CPU) and the first and last loss.
A mixer that fails (say, out of memory) is recorded with its error and the others still run.
A CPU smoke test: `--preset tiny --ctx 64 --batch 2 --steps 3 --mixers softmax --peak-tflops 1`
(a given peak skips the matmul measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import lm
from experiments.bench_train import matmul_peak, model_flops
from ttt.models import PRESETS, build_model, param_count
from ttt.train.setup import build_setup, resolve_config


def paper_config(mixer: str, preset: str, ctx: int, batch: int, steps: int):
    """The paper recipe for one device at `batch` x `ctx` tokens, `steps` steps."""
    config = lm.get_config(f"{mixer},{preset},ctx={ctx},paper")
    config.train.update(global_batch_size=batch, steps=steps, parallel="single")
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(steps // 10, 1))
    return config


def measure(mixer: str, preset: str, ctx: int, batch: int, steps: int) -> dict:
    """Compile and run `steps` train steps of one paper config; see the module docstring."""
    config = paper_config(mixer, preset, ctx, batch, steps)
    vocab = PRESETS["lm"][preset]["vocab_size"]
    meta = {"vocab_size": vocab, "seq_len": ctx}
    setup = build_setup(resolve_config(config, meta), meta, build_model)
    placement = setup.placement
    state = placement.place_state(setup.create_state)
    rng = np.random.default_rng(0)

    def batch_at(i):
        tokens = rng.integers(0, vocab, size=(batch, ctx + 1), dtype=np.int32)
        return placement.place_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                      "mask": np.ones((batch, ctx), np.float32)})

    t0 = time.perf_counter()
    compiled = placement.compile_train(setup.train_step).lower(state, batch_at(0)).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, losses = [], []
    for i in range(steps):
        data = batch_at(i)
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"{mixer}: non-finite loss {losses}")
    step_s = statistics.median(times[2:] or times)
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"mixer": mixer, "params": param_count(state.params), "step_s": step_s,
            "runs": times, "tokens_per_s": batch * ctx / step_s, "compile_s": compile_s,
            "model_flops": model_flops(preset, mixer, ctx, batch),
            "xla_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                             - mem.alias_size_in_bytes + mem.temp_size_in_bytes),
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "first_loss": losses[0], "last_loss": losses[-1]}


def markdown(result: dict) -> str:
    """The table of the JSON result."""
    gib, peak = 2.0**30, result["peak_tflops"]
    lines = [f"Paper recipe `{result['preset']}`, batch {result['batch']} x {result['ctx']} "
             f"tokens, bfloat16 compute, remat block, {result['steps']} steps from a fresh "
             f"initialisation; {result['machine']['devices'][0]}, jax {result['machine']['jax']}"
             f"; peak {peak:.1f} TFLOP/s ({result['peak_source']}).", "",
             "| mixer | params | step (ms) | tokens/s | MFU | peak memory (GiB) | XLA footprint "
             "(GiB) | loss first → last | compile (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mixer']} | – | failed: {r['error']} | | | | | | |")
            continue
        rate = r["model_flops"] / r["step_s"] / 1e12
        used = r["peak_bytes_in_use"]
        lines.append(
            f"| {r['mixer']} | {r['params'] / 1e6:.1f}M | {r['step_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {100 * rate / peak:.1f} % | "
            f"{'–' if used is None else f'{used / gib:.2f}'} | {r['xla_bytes'] / gib:.2f} | "
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['compile_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    """Parse the flags, measure every mixer, write the JSON and markdown files."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/gpu")
    parser.add_argument("--mixers", default="ttt_linear,ttt_mlp,softmax")
    parser.add_argument("--preset", default="125m", choices=sorted(PRESETS["lm"]))
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: bf16 matmul peak measured now)")
    args = parser.parse_args(argv)
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    unknown = sorted(set(mixers) - set(lm.MIXERS))
    if unknown:
        parser.error(f"unknown mixers {unknown}; known: {', '.join(lm.MIXERS)}")
    if min(args.ctx, args.batch, args.steps) < 1:
        parser.error("--ctx, --batch and --steps must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    ceiling = matmul_peak(jnp.bfloat16) if args.peak_tflops is None else {}
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "devices": [str(d.device_kind) for d in jax.devices()]},
        "preset": args.preset, "ctx": args.ctx, "batch": args.batch, "steps": args.steps,
        "matmul": ceiling, "peak_tflops": args.peak_tflops or ceiling["peak_tflops"],
        "peak_source": "--peak-tflops" if args.peak_tflops else "measured bf16 matmul",
        "rows": [],
    }
    for mixer in mixers:
        try:
            row = measure(mixer, args.preset, args.ctx, args.batch, args.steps)
        except Exception as e:  # one mixer failing (e.g. out of memory) keeps the others
            row = {"mixer": mixer, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    stem = os.path.join(args.out, f"gpu_paper_{args.preset}_{args.ctx}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md, flush=True)
    return result


if __name__ == "__main__":
    main()
