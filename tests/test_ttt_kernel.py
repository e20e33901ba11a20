"""The fused Pallas kernel of the dual form (`ttt.ops.kernels.ttt_dual`) against the XLA dual form.

On the CPU the kernel runs in Pallas interpret mode: the same kernel body, traced the same way,
executed by XLA. Every check compares the kernel with `ttt_dual(kernel="xla")` — outputs, final
state and the gradients with respect to q, k, v, η, W0 and the LayerNorm parameters — in float32,
with N not a multiple of b, both learners, both backbones, and inside a scanned, rematerialised
LM. The GPU build (Triton) is checked here by lowering the kernels for CUDA (every primitive must
have a Triton lowering); running them is `experiments/gpu_check.sh`'s job.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt.layers import TTTMixer
from ttt.models import build_model
from ttt.ops import learners as L
from ttt.ops._scan import eta_matrix
from ttt.ops.kernels import ttt_dual as K
from ttt.ops.ttt import ttt, ttt_dual

B, H, D = 2, 2, 4
LEARNERS = {"ln_linear": L.ln_residual(L.linear()), "ln_mlp": L.ln_residual(L.mlp()),
            "linear_nobias": L.linear(bias=False)}
fast_jit = functools.partial(jax.jit, compiler_options={
    "xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True})


def make_case(name, n, b, dtype=jnp.float32, seed=0, d=D):
    """Random (learner, W0 (H, ...), q, k, v, eta rows (B, H, N, b), fixed, probe weights)."""
    lrn = LEARNERS[name]
    rng = np.random.default_rng(seed)
    per_head = lrn.init(jax.random.PRNGKey(seed), d)
    W0 = jax.tree_util.tree_map(
        lambda w: jnp.asarray(0.4 * rng.normal(size=(H, *w.shape)), dtype), per_head)
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, n, d)), dtype) for _ in range(3))
    eta = jnp.asarray(rng.uniform(0.05, 0.4, size=(B, H, n, b)), dtype)
    fixed = None
    if name.startswith("ln_"):
        fixed = {"scale": jnp.asarray(1.0 + 0.2 * rng.normal(size=(H, d)), dtype),
                 "bias": jnp.asarray(0.2 * rng.normal(size=(H, d)), dtype)}
    Rz = jnp.asarray(rng.normal(size=q.shape), dtype)
    RW = jax.tree_util.tree_map(
        lambda w: jnp.asarray(rng.normal(size=(B, *w.shape)), dtype), W0)
    return lrn, W0, q, k, v, eta, fixed, (Rz, RW)


@functools.cache
def value_and_grads(name, b, save_every):
    """jit: for the XLA dual form and the kernel, (z, W_N, grads w.r.t. q, k, v, eta, W0, fixed)
    of a random linear functional of z and W_N."""
    lrn = LEARNERS[name]

    def run(q, k, v, eta, W0, fixed, probe):
        Rz, RW = probe
        out = {}
        for kernel in ("xla", "pallas"):
            def loss(q, k, v, eta, W0, fixed, kernel=kernel):
                if kernel == "xla":
                    z, W_N = ttt_dual(lrn, W0, q, k, v, eta, mini_batch=b, fixed=fixed,
                                      kernel="xla")
                else:  # the kernel entry point, to set save_every
                    W0_bh = jax.tree_util.tree_map(
                        lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)
                    z, W_N = K.ttt_dual_pallas(lrn, W0_bh, fixed, q, k, v, eta_matrix(eta, b),
                                               save_every=save_every)
                probe = jnp.sum(z * Rz) + sum(
                    jnp.sum(W_N[n] * RW[n]) for n in W_N)
                return probe, (z, W_N)

            grads, (z, W_N) = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)(
                q, k, v, eta, W0, fixed)
            out[kernel] = (z, W_N, grads)
        return out

    return fast_jit(run)


CASES = [
    # learner, N, b, save_every: N % b != 0 everywhere; save_every 3 leaves a padded last group
    ("ln_linear", 10, 4, 1),
    ("ln_mlp", 11, 4, 3),
    ("linear_nobias", 9, 2, 2),
    pytest.param("ln_linear", 37, 8, 4, marks=pytest.mark.slow),
    pytest.param("ln_mlp", 37, 8, 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,n,b,save_every", CASES)
def test_kernel_equals_xla_dual_form_float32(name, n, b, save_every):
    lrn, W0, q, k, v, eta, fixed, probe = make_case(name, n, b)
    out = value_and_grads(name, b, save_every)(q, k, v, eta, W0, fixed, probe)
    z_x, W_x, g_x = out["xla"]
    z_k, W_k, g_k = out["pallas"]
    assert z_k.shape == q.shape and z_k.dtype == jnp.float32
    assert_close(z_k, z_x, 1e-5, "z")
    assert_close(W_k, W_x, 1e-5, "W_N")
    names = ("q", "k", "v", "eta", "W0", "fixed")
    for what, a, e in zip(names, g_k, g_x, strict=True):
        # LN over 4 features amplifies float32 roundoff in gradients (as in test_ttt_ops)
        assert_close(a, e, 2e-5, f"grad {what}")
    if fixed is not None:
        assert float(jnp.max(jnp.abs(g_k[5]["scale"]))) > 0  # the LN parameters get gradients
    # negative control: one learning rate changed is seen
    out2 = value_and_grads(name, b, save_every)(q, k, v, eta.at[0, 1, n - 2, 0].add(0.3), W0,
                                                fixed, probe)
    assert rel_err(out2["pallas"][0], z_k) > 1e-4


def test_kernel_float64_is_exact(x64):
    """In float64 the kernel and the XLA dual form agree to roundoff (no tolerance to hide in)."""
    lrn, W0, q, k, v, eta, fixed, probe = make_case("ln_mlp", 10, 4, dtype=jnp.float64)
    out = value_and_grads("ln_mlp", 4, 2)(q, k, v, eta, W0, fixed, probe)
    assert_close(out["pallas"], out["xla"], 1e-12, "kernel vs xla (f64)")


def test_kernel_bfloat16_inputs_close_to_float32():
    """bf16 q, k, v (state and accumulation in float32) within 1e-2 of the float32 outputs."""
    lrn, W0, q, k, v, eta, fixed, _ = make_case("ln_linear", 24, 8, d=16, seed=3)
    eta = 0.05 * eta  # well-scaled: the learning rates of a TTT layer (base_lr / d) are small
    W0_bh = jax.tree_util.tree_map(lambda w: jnp.broadcast_to(w, (B, *w.shape)), W0)

    def run(q, k, v):
        return K.ttt_dual_pallas(lrn, W0_bh, fixed, q, k, v, eta_matrix(eta, 8))[0]

    z32 = fast_jit(run)(q, k, v)
    bf = lambda x: x.astype(jnp.bfloat16)
    z16 = fast_jit(run)(bf(q), bf(k), bf(v))
    assert z16.dtype == jnp.float32  # the answers come in the state's dtype
    err = rel_err(z16, z32)
    assert 1e-5 < err < 1e-2, err  # bf16 operands are really used, and stay close


def _layer_grads(backbone, learner, kernel, x, ct, p=None):
    m = TTTMixer(16, 2, learner=learner, backbone=backbone, mini_batch=4, kernel=kernel,
                 stats=False)
    p = m.init(jax.random.PRNGKey(0), x) if p is None else p
    p = jax.tree_util.tree_map(lambda w: w + 0.05 * jnp.sin(jnp.arange(w.size).reshape(w.shape)
                                                            * 1.7), p)

    def loss(p, x):
        y, _ = m.apply(p, x)
        return jnp.sum(y * ct), y

    return fast_jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)


@pytest.mark.parametrize("backbone,learner", [("transformer", "linear"), ("mamba", "mlp")])
def test_layer_kernel_equals_xla(backbone, learner):
    """TTTMixer(kernel="pallas") == kernel="xla" for both backbones: outputs, every gradient."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 16)), jnp.float32)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=(2, 11, 16)), jnp.float32)
    (l_x, y_x), g_x = _layer_grads(backbone, learner, "xla", x, ct)
    (l_k, y_k), g_k = _layer_grads(backbone, learner, "pallas", x, ct)
    assert_close(y_k, y_x, 1e-5, "y")
    assert_close(g_k, g_x, 5e-5, "grads")


def test_kernel_inside_scanned_rematerialised_lm():
    """A 2-layer LM with scan_layers and remat="block" (jax.checkpoint inside lax.scan): the
    kernel's loss and parameter gradients equal the XLA path's."""
    cfg = lambda kernel: ml_collections.ConfigDict(dict(
        kind="lm", preset="tiny", mixer="ttt_linear", dtype="float32", scan_layers=True,
        remat="block", vocab_size=32, width=16, num_heads=2, ffn_dim=32,
        mixer_kwargs={"mini_batch": 4, "kernel": kernel}))
    ids = jax.random.randint(jax.random.key(0), (2, 10), 0, 32)
    models = {k: build_model(cfg(k)) for k in ("xla", "pallas")}
    params = models["xla"].init(jax.random.key(1), ids)["params"]

    def run(params):
        out = {}
        for k, m in models.items():
            out[k] = jax.value_and_grad(
                lambda p, m=m: jnp.mean(m.apply({"params": p}, ids)[0] ** 2))(params)
        return out

    out = fast_jit(run)(params)
    assert_close(out["pallas"][0], out["xla"][0], 1e-6, "loss")
    # float32 through two layers: the token offsets' gradient is ~1e-5 in size, and its sums
    # (over B, H and the tokens at each position) differ in roundoff order between the paths
    assert_close(out["pallas"][1], out["xla"][1], 2e-4, "grads")


def test_kernel_selection_and_errors():
    lrn, W0, q, k, v, eta, fixed, _ = make_case("ln_linear", 10, 4)
    # auto on a CPU is the XLA path: no pallas_call in the program
    jaxpr = jax.make_jaxpr(lambda q: ttt(lrn, W0, q, k, v, eta, mini_batch=4, fixed=fixed))(q)
    assert "pallas_call" not in str(jaxpr)
    jaxpr = jax.make_jaxpr(lambda q: ttt(lrn, W0, q, k, v, eta, mini_batch=4, fixed=fixed,
                                         kernel="pallas"))(q)
    assert "pallas_call" in str(jaxpr)
    with pytest.raises(ValueError, match="kernel: unknown 'triton'; known: auto, xla, pallas"):
        ttt(lrn, W0, q, k, v, eta, mini_batch=4, fixed=fixed, kernel="triton")
    with pytest.raises(ValueError, match="kernel: unknown"):
        TTTMixer(16, 2, kernel="cuda")
    # what a GPU would run: Triton wants powers of 2 >= 16
    mlp = L.ln_residual(L.mlp())
    W = {n: jnp.zeros(s) for n, s in
         (("W1", (64, 256)), ("b1", (256,)), ("W2", (256, 64)), ("b2", (64,)))}
    assert K.unsupported(mlp, W, 64, 64, 16, jnp.float32, "gpu") is None
    assert "mini_batch = 8" in K.unsupported(mlp, W, 64, 64, 8, jnp.float32, "gpu")
    assert "d_in = 48" in K.unsupported(mlp, W, 48, 64, 16, jnp.float32, "gpu")
    assert "float16" in K.unsupported(mlp, W, 64, 64, 16, jnp.float16, "gpu")
    assert "GPU only" in K.unsupported(mlp, W, 64, 64, 16, jnp.float32, "tpu")
    primal_only = L.Learner("tanh", lambda key, d: {"W": jnp.zeros((d, d))},
                            lambda W, x, f: jnp.tanh(x @ W["W"]))
    assert "not a dense chain" in K.unsupported(primal_only, {}, 64, 64, 16, jnp.float32, "gpu")


@pytest.mark.parametrize("learner", ["linear", "mlp"])
def test_kernels_lower_to_triton(learner):
    """Forward and backward kernels lower for CUDA (Pallas -> Triton IR) at the 125M head shape,
    float32 and bfloat16: every primitive of the traced step has a Triton lowering and every
    load/store tile is a power of 2. (Compiling and running them needs a GPU.)"""
    lrn = L.ln_residual(L.linear() if learner == "linear" else L.mlp())
    d, b, n = 64, 16, 40
    W0 = jax.tree_util.tree_map(lambda w: jnp.zeros((1, 2, *w.shape)),
                                lrn.init(jax.random.PRNGKey(0), d))
    fixed = {"scale": jnp.ones((2, d)), "bias": jnp.zeros((2, d))}
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.zeros((1, 2, n, d), dtype)
        eta = jnp.zeros((1, 2, n, b))

        def loss(x, eta, W0, fixed):
            z, W = K.ttt_dual_pallas(lrn, W0, fixed, x, x, x, eta_matrix(eta, b),
                                     interpret=False)
            return jnp.sum(z) + sum(jnp.sum(w) for w in W.values())

        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
            x, eta, W0, fixed).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2  # forward and backward
