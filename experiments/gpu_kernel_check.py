"""The fused Pallas kernel on a GPU: correctness against the XLA dual form, then its speed.

    python -m experiments.gpu_kernel_check --out runs/gpu_check [--smoke]

On a GPU the kernel runs compiled (Triton), at the 125M head shape (d = 64, b = 16) with N not a
multiple of b: outputs, final state and the gradients w.r.t. q, k, v, η, W0 and the LayerNorm
parameters against `ttt_dual(kernel="xla")` computed at full float32 precision
(`jax.default_matmul_precision("highest")`: XLA's GPU default would be TF32), for both learners
and two state-checkpoint intervals; bfloat16 inputs against the float32 outputs; then the op's
fwd+bwd time by both paths at batch 1 and 8. `--smoke` runs the same code on a CPU (interpret
mode, tiny sizes) to check the script itself. Writes kernel_check.json and kernel_check.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.timing import timed_calls
from ttt.ops import learners as L
from ttt.ops._scan import eta_matrix
from ttt.ops.kernels import ttt_dual as K
from ttt.ops.ttt import ttt_dual

LIMITS = {"f32": 1e-5, "f32_grads": 1e-4, "bf16": 1e-2}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def case(learner, B, H, N, d, b, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    W0 = jax.tree_util.tree_map(lambda w: jnp.asarray(0.02 * rng.normal(size=(H, *w.shape)),
                                                      jnp.float32),
                                learner.init(jax.random.PRNGKey(seed), d))
    fixed = {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=(H, d)), jnp.float32),
             "bias": jnp.asarray(0.1 * rng.normal(size=(H, d)), jnp.float32)}
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, N, d)) / np.sqrt(d), dtype) for _ in range(3))
    # TTT-LM's learning rates: base_lr / d times gates in (0, 1), times 1/(i+1) per position
    eta = jnp.asarray(rng.uniform(0, 1, size=(B, H, N, b)) / d, jnp.float32)
    ct = jnp.asarray(rng.normal(size=(B, H, N, d)), jnp.float32)
    return W0, fixed, q, k, v, eta, ct


def paths(learner, b, save_every):
    """jit: z, W_N and grads by the kernel and by XLA (full precision)."""

    def run(kernel, q, k, v, eta, W0, fixed, ct):
        def loss(q, k, v, eta, W0, fixed):
            if kernel == "xla":
                with jax.default_matmul_precision("highest"):
                    z, W = ttt_dual(learner, W0, q, k, v, eta, mini_batch=b, fixed=fixed,
                                    kernel="xla")
            else:
                W0_bh = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (q.shape[0],
                                                                              *w.shape)), W0)
                z, W = K.ttt_dual_pallas(learner, W0_bh, fixed, q, k, v, eta_matrix(eta, b),
                                         save_every=save_every)
            return jnp.sum(z.astype(jnp.float32) * ct), (z, W)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)(q, k, v, eta, W0, fixed)

    return {p: jax.jit(lambda *a, p=p: run(p, *a)) for p in ("xla", "pallas")}


def correctness(shape, log) -> list[dict]:
    B, H, N, d, b = shape
    rows = []
    for name, learner in (("ln_linear", L.ln_residual(L.linear())),
                          ("ln_mlp", L.ln_residual(L.mlp()))):
        W0, fixed, q, k, v, eta, ct = case(learner, B, H, N, d, b)
        for save_every in (1, 4):
            fns = paths(learner, b, save_every)
            gx, (zx, Wx) = fns["xla"](q, k, v, eta, W0, fixed, ct)
            gk, (zk, Wk) = fns["pallas"](q, k, v, eta, W0, fixed, ct)
            grads = {n: rel(a, c) for n, a, c in zip(
                ("q", "k", "v", "eta"), gk[:4], gx[:4], strict=True)}
            grads["W0"] = max(rel(gk[4][n], gx[4][n]) for n in gx[4])
            grads["ln"] = max(rel(gk[5][n], gx[5][n]) for n in gx[5])
            row = {"learner": name, "save_every": save_every, "z": rel(zk, zx),
                   "W_N": max(rel(Wk[n], Wx[n]) for n in Wx), "grads": grads}
            row["ok"] = (row["z"] <= LIMITS["f32"] and row["W_N"] <= LIMITS["f32"]
                         and max(grads.values()) <= LIMITS["f32_grads"])
            log(json.dumps(row))
            rows.append(row)
        # bf16 inputs against the float32 outputs of the kernel itself
        bf = lambda x: x.astype(jnp.bfloat16)
        fwd = jax.jit(lambda q, k, v: K.ttt_dual_pallas(
            learner, jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0),
            fixed, q, k, v, eta_matrix(eta, b))[0])
        err = rel(fwd(bf(q), bf(k), bf(v)), fwd(q, k, v))
        row = {"learner": name, "bf16_vs_f32": err, "ok": err <= LIMITS["bf16"]}
        log(json.dumps(row))
        rows.append(row)
    return rows


def speed(cases, log) -> list[dict]:
    """fwd+bwd of the op alone by both paths (XLA at its default precision, as a layer runs)."""
    rows = []
    for name, learner in (("ln_linear", L.ln_residual(L.linear())),
                          ("ln_mlp", L.ln_residual(L.mlp()))):
        for B, H, N, d, b in cases:
            W0, fixed, q, k, v, eta, ct = case(learner, B, H, N, d, b)
            out = {"learner": name, "B": B, "H": H, "N": N}
            for kernel in ("xla", "pallas"):
                def loss(q, k, v, eta, W0, fixed, kernel=kernel):
                    z, _ = ttt_dual(learner, W0, q, k, v, eta, mini_batch=b, fixed=fixed,
                                    kernel=kernel)
                    return jnp.sum(z * ct)

                fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5)))
                runs = timed_calls(fb, q, k, v, eta, W0, fixed, runs=5)
                out[f"{kernel}_fb_ms"] = 1e3 * statistics.median(runs)
            out["xla_over_pallas"] = out["xla_fb_ms"] / out["pallas_fb_ms"]
            log(json.dumps(out))
            rows.append(out)
    return rows


def markdown(result) -> str:
    lines = [f"Pallas kernel check — {result['device']}, jax {result['jax']}, backend "
             f"{result['backend']}; shape (B, H, N, d, b) = {result['shape']}.", "",
             "| learner | save_every | z | W_N | worst grad (which) | ok |",
             "|---|---:|---:|---:|---|---|"]
    for r in result["correctness"]:
        if "bf16_vs_f32" in r:
            lines.append(f"| {r['learner']} bf16 inputs vs f32 | | {r['bf16_vs_f32']:.2e} | | | "
                         f"{'yes' if r['ok'] else '**no**'} |")
            continue
        worst = max(r["grads"], key=r["grads"].get)
        lines.append(f"| {r['learner']} | {r['save_every']} | {r['z']:.2e} | {r['W_N']:.2e} | "
                     f"{r['grads'][worst]:.2e} ({worst}) | {'yes' if r['ok'] else '**no**'} |")
    lines += ["", "| learner | B | H | N | XLA fwd+bwd ms | Pallas fwd+bwd ms | XLA / Pallas |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["speed"]:
        lines.append(f"| {r['learner']} | {r['B']} | {r['H']} | {r['N']} | {r['xla_fb_ms']:.2f} | "
                     f"{r['pallas_fb_ms']:.2f} | {r['xla_over_pallas']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU: interpret mode)")
    args = parser.parse_args(argv)
    log = lambda s: print(s, flush=True)
    shape = (1, 2, 40, 16, 8) if args.smoke else (2, 4, 200, 64, 16)  # N % b != 0
    cases = [(1, 2, 64, 16, 8)] if args.smoke else [
        (1, 12, 2048, 64, 16), (1, 12, 8192, 64, 16), (8, 12, 2048, 64, 16)]
    if not args.smoke and jax.default_backend() != "gpu":
        raise SystemExit("gpu_kernel_check: no GPU (use --smoke to check the script on a CPU)")
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__,
              "backend": jax.default_backend(), "shape": shape}
    result["correctness"] = correctness(shape, log)
    result["speed"] = speed(cases, log)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernel_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out, "kernel_check.md"), "w") as f:
        f.write(md)
    log(md)
    ok = all(r["ok"] for r in result["correctness"])
    log("kernel check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
