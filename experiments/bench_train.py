"""Train-step throughput and MFU of an LM preset (TTT-Linear vs Transformer and others).

    python -m experiments.bench_train --out runs/bench_train [--preset 125m] [--seq-len 2048]
        [--batch 8] [--dtype bfloat16] [--mixers ttt_linear,softmax] [--steps 10]

For each mixer: the trainer's own train step (`ttt.train.build_setup` on the LM recipe of
`experiments/lm.py`: clipped AdamW, single-device placement, the state donated) on random tokens,
jit-compiled once; the median of --steps timed steps after two warm-up steps
(`block_until_ready`). Prints and writes (bench_train.json, bench_train.md):
tokens/s, step time, compile time, model FLOPs per step and MFU.

- Model FLOPs are written down from the math: 3 × the forward FLOPs (forward + backward) of every
  layer's mixer (the registry's `flops`, `ttt.layers.costs`, projections included; softmax counted
  as full N² attention, the usual MFU convention), SwiGLU (3 matrices of width × ffn_dim) and the
  output head (width × vocab). Norms, the embedding gather and the optimizer are not counted.
  (XLA's `cost_analysis` is no cross-check here: it counts the body of the scan over layers once.)
- MFU = model FLOPs / step time / peak. The peak is the best matmul rate measured in this run in
  the compute dtype (square products up to 8192 on an accelerator, 2048 on a CPU), or
  --peak-tflops when given (for example a datasheet figure).
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

from experiments.bench import LABELS, flops_fwd, lm_train_setup
from experiments.timing import compile_timed, matmul_rates
from ttt.models import PRESETS, param_count

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def matmul_peak(dtype, runs: int = 10) -> dict:
    """Best TFLOP/s of square matmuls in `dtype` (sizes by backend), measured now."""
    sizes = (2048, 4096, 8192) if jax.default_backend() != "cpu" else (1024, 2048)
    rates = matmul_rates({f"square_{n}": (n, n, n) for n in sizes}, dtype, runs)
    out = {name: rate / 1e12 for name, rate in rates.items()}
    out["peak_tflops"] = max(out.values())
    return out


def model_flops(preset: str, mixer: str, seq_len: int, batch: int) -> float:
    """Forward + backward FLOPs of one train step from the math (see module docstring)."""
    dims = PRESETS["lm"][preset]
    C, H, F, V, L = (dims[k] for k in ("width", "num_heads", "ffn_dim", "vocab_size",
                                       "num_layers"))
    per_layer = flops_fwd(mixer, seq_len, C, H) + 3 * 2.0 * seq_len * C * F
    head = 2.0 * seq_len * C * V
    return 3.0 * batch * (L * per_layer + head)


def measure(preset: str, mixer: str, seq_len: int, batch: int, dtype: str, steps: int,
            remat: str) -> dict:
    """Compile and time the train step of one LM; see the module docstring."""
    setup = lm_train_setup(*LABELS[mixer], preset, seq_len, batch, dtype=dtype, remat=remat)
    placement = setup.placement
    tokens = jax.random.randint(jax.random.PRNGKey(0), (batch, seq_len + 1), 0,
                                PRESETS["lm"][preset]["vocab_size"], jnp.int32)
    data = placement.place_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                  "mask": jnp.ones((batch, seq_len), jnp.float32)})
    state = placement.place_state(setup.create_state)
    compiled, compile_s = compile_timed(placement.compile_train(setup.train_step), state, data)
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, data)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    loss = float(metrics["loss"])
    if not jnp.isfinite(loss):
        raise FloatingPointError(f"{mixer}: non-finite loss {loss} in the timed steps")
    step_s = statistics.median(times)
    return {"mixer": mixer, "params": param_count(state.params), "step_s": step_s, "runs": times,
            "tokens_per_s": batch * seq_len / step_s, "compile_s": compile_s,
            "model_flops": model_flops(preset, mixer, seq_len, batch),
            "loss": loss}


def markdown(result: dict) -> str:
    """The table of bench_train.json."""
    peak = result["peak_tflops"]
    lines = [f"Train step, preset {result['preset']}, batch {result['batch']} × "
             f"{result['seq_len']} tokens, {result['dtype']}, remat {result['remat']}; "
             f"{result['machine']['devices'][0]}, jax {result['machine']['jax']}; "
             f"peak {peak:.1f} TFLOP/s ({result['peak_source']}).", "",
             "| mixer | params | step (ms) | tokens/s | compile (s) | model TFLOP/step "
             "| TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['mixer']} | – | failed: {r['error']} | | | | | |")
            continue
        rate = r["model_flops"] / r["step_s"] / 1e12
        lines.append(f"| {r['mixer']} | {r['params'] / 1e6:.1f}M | {r['step_s'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['compile_s']:.1f} | "
                     f"{r['model_flops'] / 1e12:.3f} | {rate:.2f} | "
                     f"{100 * rate / peak:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Parse the flags, measure every mixer, write bench_train.json / bench_train.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_train")
    parser.add_argument("--preset", default="125m", choices=sorted(PRESETS["lm"]))
    parser.add_argument("--mixers", default="ttt_linear,softmax",
                        help=f"comma-separated subset of {', '.join(LABELS)}")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--remat", default="none", help="the model's remat choice")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: matmul peak measured in this run)")
    args = parser.parse_args(argv)
    mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    unknown = sorted(set(mixers) - set(LABELS))
    if unknown:
        parser.error(f"unknown mixers {unknown}; known: {', '.join(LABELS)}")
    if args.seq_len < 1 or args.batch < 1 or args.steps < 1:
        parser.error("--seq-len, --batch and --steps must be >= 1")
    os.makedirs(args.out, exist_ok=True)

    ceiling = matmul_peak(DTYPES[args.dtype])
    peak = args.peak_tflops or ceiling["peak_tflops"]
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "jax": jax.__version__,
                    "backend": jax.default_backend(),
                    "devices": [str(d.device_kind) for d in jax.devices()]},
        "preset": args.preset, "seq_len": args.seq_len, "batch": args.batch,
        "dtype": args.dtype, "remat": args.remat, "matmul": ceiling, "peak_tflops": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else f"measured {args.dtype} matmul",
        "rows": [],
    }
    print(json.dumps(ceiling), flush=True)
    for mixer in mixers:
        try:
            row = measure(args.preset, mixer, args.seq_len, args.batch, args.dtype, args.steps,
                          args.remat)
        except Exception as e:  # one mixer failing (e.g. out of memory) keeps the others
            row = {"mixer": mixer, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    with open(os.path.join(args.out, "bench_train.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out, "bench_train.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return result


if __name__ == "__main__":
    main()
