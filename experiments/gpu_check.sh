#!/usr/bin/env bash
# One GPU run for the fused Pallas kernel, LaCT and the delta-rule family (docs/gpu/README.md), in
# under 10 minutes:
#   1. JAX with CUDA (the installed build, else `pip install jax[cuda12]` of the same version),
#      and the project's Python dependencies (from wheels carried in .whl/ when offline);
#   2. the kernel compiled on the GPU against the XLA dual form (experiments/gpu_kernel_check.py:
#      outputs, state, gradients, bf16 vs f32; op fwd+bwd time by both paths);
#   3. the layer bench: TTT-Linear / TTT-MLP by XLA and by the kernel, 2k and 8k, batch 8;
#   4. the 125m train step at batch 16 × 2048 in bfloat16 (kernel, XLA, linear attention);
#   5. the LaCT layer at 8k, batch 8, bf16 against the bf16 matmul rate (experiments/gpu_lact.py);
#   6. the delta-rule family's layers and ops alone, 2k and 8k (the family's targets on the GPU).
# Usage, on any machine with an NVIDIA GPU, from the repository root:
#   pip install -c constraints.txt -e '.[cuda]'   # JAX with CUDA 12 (else step 1 installs it)
#   bash experiments/gpu_check.sh [OUT]            # default OUT: runs/gpu_check
# On a machine without network access, JAX with CUDA must be installed already; put the wheels
# of any other dependency it lacks in .whl/ (step 1 installs from there), prepared where the
# network is reachable, e.g.
#   pip download --no-deps -d .whl ml_collections
# SMOKE=1 checks the script itself on a CPU: no installs, tiny shapes, kernel interpreted.
# When steps 2-4 pass on a GPU, add "gpu" to VALIDATED_BACKENDS in ttt/ops/kernels/ttt_dual.py:
# only then does kernel="auto" (the TTT layers' default) pick the fused kernel there.
set -uo pipefail
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - start )) s)"; }

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  KCHECK="--smoke"; BENCH="--width 32 --heads 2 --ns 64 --runs 1 --batch 2 --batch-n 32"
  TRAIN="--preset tiny --seq-len 32 --batch 2 --steps 1"; LACT="--smoke"
  FAMILY="--width 32 --heads 2 --ns 64 --runs 1"
else
  KCHECK=""; BENCH="--runs 5 --ns 2048,8192 --batch 8 --batch-n 2048 --max-mem-gib 40"
  TRAIN="--batch 16 --steps 5"; LACT="--n 8192 --batch 8 --runs 5"
  FAMILY="--runs 3 --ns 2048,8192 --max-mem-gib 40"
fi

step "1. JAX with CUDA, dependencies"
if [ "$SMOKE" != 1 ] && ! $PY -c "import jax; assert jax.default_backend() == 'gpu'" 2>/dev/null; then
  version=$($PY -c "import jax; print(jax.__version__)" 2>/dev/null || echo "")
  $PY -m pip install --quiet "jax[cuda12]${version:+==$version}" || $PY -m pip install --quiet "jax[cuda12]"
fi
missing=$($PY - <<'EOF'
import importlib
mods = {"flax": "flax", "optax": "optax", "ml_collections": "ml_collections", "orbax": "orbax-checkpoint",
        "grain": "grain", "etils": "etils", "matplotlib": "matplotlib"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ] && [ "$SMOKE" != 1 ]; then
  echo "installing: $missing"
  if [ -d .whl ]; then $PY -m pip install --quiet --no-index --find-links .whl $missing; fi
  $PY -m pip install --quiet $missing 2>/dev/null || true
fi
{ $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices())"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null; } | tee "$OUT/device.txt"
[ "$SMOKE" = 1 ] || $PY -c "import jax; assert jax.default_backend() == 'gpu', 'no GPU'" || exit 2

step "2. kernel vs XLA on the GPU (compiled Triton), op timings"
timeout 180 $PY -m experiments.gpu_kernel_check --out "$OUT" $KCHECK 2>&1 | tail -40 | tee "$OUT/kernel_check.log"

step "3. layer bench: both paths, 2k and 8k, batch 8"
timeout 140 $PY -m experiments.bench --out "$OUT/bench" $BENCH --skip ops,decode,remat,lm_compile \
  --mixers ttt_linear,ttt_linear_pallas,ttt_mlp,ttt_mlp_pallas 2>&1 | tail -60 | tee "$OUT/bench.log"

step "4. 125m train step, batch 16 x 2048, bfloat16"
timeout 130 $PY -m experiments.bench_train --out "$OUT/train" $TRAIN \
  --mixers ttt_linear_pallas,ttt_linear,linattn_chunked 2>&1 | tail -20 | tee "$OUT/train.log"

step "5. LaCT layer, 8k, batch 8, bfloat16, against the bf16 matmul rate"
timeout 90 $PY -m experiments.gpu_lact --out "$OUT/lact" $LACT 2>&1 | tail -5 | tee "$OUT/lact.log"

step "6. the delta-rule family: layers and ops alone, 2k and 8k"
timeout 100 $PY -m experiments.bench --out "$OUT/family" $FAMILY \
  --skip batch,decode,remat,lm_compile,small \
  --mixers deltanet,gated_deltanet_v1,mamba2,ttt_linear_primal_mb1 2>&1 | tail -90 | tee "$OUT/family.log"

step "done"
