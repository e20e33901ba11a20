"""LaCT on an accelerator: the layer's forward+backward against the measured bf16 matmul rate.

    python -m experiments.gpu_lact --out runs/gpu_lact [--n 8192] [--batch 8] [--runs 5] [--smoke]

The large-chunk layer (`lact`, the benchmark's shape: width 768, 12 heads, chunk 2048, Muon) in
bfloat16 at N tokens and a batch of sequences, timed as `experiments.bench` times a layer (median
of `--runs` calls of the jitted VJP of a fixed cotangent), against the best of two bf16 matmuls
timed in the same process. FLOPs are the registry's (the math, `ttt.layers.costs`; fwd+bwd = 3 ×
fwd). Target: ≥ 50 % of the matmul rate at 8k, batch 8. Writes lact.json
to --out and prints one line. `--smoke` checks the script on a CPU (tiny shapes, one run).
`experiments/gpu_check.sh` runs it as its last step.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from experiments import bench
from experiments.args import positive_int
from experiments.timing import matmul_rates
from ttt.layers import forward_flops

TARGET = 0.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_lact")
    parser.add_argument("--n", type=positive_int, default=8192)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run (any device)")
    args = parser.parse_args(argv)
    width, heads, n, batch, runs = bench.WIDTH, bench.HEADS, args.n, args.batch, args.runs
    kwargs = dict(bench.LABELS["lact"][1], dtype=jnp.bfloat16)
    if args.smoke:
        width, heads, n, batch, runs = 64, 4, 256, 2, 1
        kwargs["chunk"] = 64
    side = 512 if args.smoke else 8192
    rates = matmul_rates({f"square_{side}": (side, side, side),
                          "projection": (batch * n, width, 3 * width)}, jnp.bfloat16, runs)
    peak = max(rates.values())
    row = bench.measure_layer("lact", n, runs, width, heads, batch, **kwargs)
    flops = 3 * batch * forward_flops("lact", n, width, heads,
                                      **{k: v for k, v in kwargs.items() if k != "dtype"})
    frac = flops / row["fb_s"] / peak
    result = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "n": n,
              "batch": batch, "width": width, "heads": heads, "dtype": "bfloat16",
              "fb_s": row["fb_s"], "fwd_s": row["fwd_s"], "flops_fb": flops,
              "matmul_flops_per_s": rates, "fraction_of_matmul": frac, "target": TARGET,
              "met": frac >= TARGET}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "lact.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"lact fwd+bwd N={n} batch {batch} bf16 on {result['backend']}: "
          f"{row['fb_s'] * 1e3:.1f} ms, {flops / row['fb_s'] / 1e12:.2f} TFLOP/s = "
          f"{100 * frac:.1f} % of the bf16 matmul rate ({peak / 1e12:.2f} TFLOP/s); target "
          f">= {100 * TARGET:.0f} %: {'met' if result['met'] else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
