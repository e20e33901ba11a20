"""`import ttt` turns off XLA:CPU's YNNPACK fusions under jaxlib 0.10 (ttt/__init__.py): with them,
a matmul with a broadcast constant operand followed by a reduction read unwritten memory, and a
DeltaNet layer whose sequence fits in one chunk gave garbage or NaN inside a jit. Both are checked
in a fresh process (the flag is read when JAX starts); without the guard both came out wrong in
every run tried (the matmul 256291 for 8371906; the layer off by 2-3x its own scale)."""

from __future__ import annotations

import os
import subprocess
import sys

import ttt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = r"""
import os
import ttt
import jax, jax.numpy as jnp, numpy as np
from ttt.layers import make_mixer

print("flags", os.environ.get("XLA_FLAGS", ""))
q = jax.random.normal(jax.random.PRNGKey(0), (8192, 32))
got = float(jax.jit(lambda q: jnp.sum(jnp.square(q @ jnp.ones((32, 32)))))(q))
want = float(np.sum(np.square(np.asarray(q, np.float64) @ np.ones((32, 32)))))
print("matmul", got, want)
# DeltaNet at N = 64 = its chunk: inputs computed inside the jit, float32, against the recurrence
# (the MQAR harness's layer shape; a few compiles, as the failure changed from one to the next)
x = jax.random.normal(jax.random.PRNGKey(1), (64, 64, 64))
fast = make_mixer("gated_deltanet", 64, 2)
slow = make_mixer("gated_deltanet", 64, 2, form="recurrent")
params = fast.init(jax.random.PRNGKey(2), x)
run = lambda m: jax.jit(lambda p, x: m.apply(p, jnp.tanh(x))[0])(params, x)
y_ref = run(slow)
err = 0.0
for _ in range(4):
    jax.clear_caches()
    err = max(err, float(jnp.max(jnp.abs(run(fast) - y_ref))))
print("deltanet", err, float(jnp.max(jnp.abs(y_ref))))
"""


def test_import_ttt_keeps_xla_cpu_from_miscomputing():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    flags = env.get("XLA_FLAGS", "").replace("--xla_cpu_experimental_ynn_fusion_type=", "")
    env["XLA_FLAGS"] = flags  # as a user's shell would have it: without the guard's flag
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    from importlib import metadata

    if metadata.version("jaxlib").startswith("0.10."):
        assert "--xla_cpu_experimental_ynn_fusion_type=" in " ".join(lines["flags"])
    got, want = map(float, lines["matmul"])
    assert abs(got - want) <= 1e-5 * want, (got, want)
    err, scale = map(float, lines["deltanet"])
    assert err <= 1e-5 * max(scale, 1.0), (err, scale)


def test_guard_leaves_a_set_flag_and_other_jaxlibs_alone(monkeypatch):
    from importlib import metadata

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+x --other=1")
    ttt._guard_xla_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=+x --other=1"
    monkeypatch.setenv("XLA_FLAGS", "--other=1")
    monkeypatch.setattr(metadata, "version", lambda name: "0.11.0")
    ttt._guard_xla_cpu()
    assert os.environ["XLA_FLAGS"] == "--other=1"
    monkeypatch.setattr(metadata, "version", lambda name: "0.10.2")
    ttt._guard_xla_cpu()
    assert os.environ["XLA_FLAGS"] == "--other=1 --xla_cpu_experimental_ynn_fusion_type="
