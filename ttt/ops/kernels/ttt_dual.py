"""The dual-form mini-batch TTT loop as one fused Pallas kernel (docs/design.md §4.9).

One program per (sequence, head) walks all mini-batches with the inner state W held in registers
(on chip), instead of one XLA op per array operation of every mini-batch step:

- forward: for every mini-batch, the keys' gradients G_l, the queries' answers z and the state
  update (the same math as `ttt.ops._dual`, written here with 2-D operands only); it writes z and
  the state at the start of every group of `save_every` mini-batches (and the final state).
- backward (`jax.custom_vjp`): walks the groups in reverse; each group is recomputed from its saved
  state into a per-program buffer of `save_every` states, then walked back mini-batch by
  mini-batch with the VJP of the step (`jax.vjp` traced inside the kernel), carrying dW.

The learner is any dense chain (`learner.dense`) with an elementwise activation and either no
`post` or the residual LayerNorm of `learners.ln_residual` (written out here; the op's
`layer_norm` is a custom-VJP primitive the kernel languages cannot lower). η is the masked b×b
matrix of every mini-batch; any N works (the sequence is padded with zero-η mini-batches, which
change no state). Matmul operands stay in the inputs' dtype (float32 or bfloat16) with float32
accumulation; the state and everything elementwise run in the state's dtype.

Backend: Pallas on Triton (`pallas.triton`). The per-step matmuls are (16 × 64) @ (64 × 64) per
head: Triton's `tl.dot` takes any M, N, K >= 16 (mma.sync on Ampere and Hopper), and its
program-per-block model is exactly "a (sequence, head) owns its state for the whole loop".
Mosaic GPU targets Hopper's warpgroup MMA (64-row tiles: 4× padding of a 16-token mini-batch) and
TMA-pipelined shared memory, and runs on Hopper+ only. TPU (Mosaic TPU) is not wired: it would
copy each whole-sequence block into VMEM, which needs a DMA pipeline to scale with N.
Triton constraints (checked by `unsupported`): power-of-2 sizes, b and every width >= 16.

On a CPU the kernel runs in interpret mode (`interpret=True`): the tests hold it equal to the XLA
dual form there.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

SAVE_EVERY = 4  # mini-batches per saved state: the backward recomputes a group from its state


class Spec(NamedTuple):
    """Static description of one kernel instance (hashable: a custom_vjp nondiff argument)."""

    dense: tuple  # ((W name, b name or None), ...) as `Learner.dense`
    activation: Any  # elementwise function between layers, or None
    ln_eps: float | None  # the residual LayerNorm post's eps, or None (no post)
    b: int  # mini-batch size
    groups: int  # S: groups of `save_every` mini-batches (the padded sequence is S·k·b tokens)
    save_every: int  # k
    dot_dtype: Any  # matmul operand dtype (the inputs' dtype)
    interpret: bool  # Pallas interpret mode (CPU) or compiled (GPU)
    grad: bool = False  # matmuls with the custom VJP (`_mm`): set where the step is differentiated

    def shapes(self, d_in, d_out, widths):
        """Per-leaf 2-D shapes of the state, in `leaf_names` order."""
        out = []
        dims = [d_in, *widths]
        for l, (_, b_name) in enumerate(self.dense):
            out.append((dims[l], dims[l + 1]))
            if b_name is not None:
                out.append((1, dims[l + 1]))
        return out

    def leaf_names(self):
        return [n for layer in self.dense for n in layer if n is not None]


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Backends where the compiled kernel has been run and held equal to the XLA dual form on real
# hardware (`experiments/gpu_check.sh`). kernel="auto" picks the kernel only on these; until a GPU
# run validates it, "auto" is the XLA dual form everywhere and kernel="pallas" asks for the kernel.
VALIDATED_BACKENDS: frozenset[str] = frozenset()


def auto_selects(backend: str | None = None) -> bool:
    """Whether kernel="auto" picks the fused kernel on `backend` (default: JAX's)."""
    return (backend or jax.default_backend()) in VALIDATED_BACKENDS


def unsupported(learner, W0, d_in, d_out, mini_batch, dtype, backend=None) -> str | None:
    """Why the kernel cannot run this case on `backend` (default: JAX's), or None if it can."""
    backend = backend or jax.default_backend()
    if getattr(learner, "dense", None) is None:
        return f"learner {learner.name!r} is not a dense chain"
    if learner.post is not None and learner.ln_eps is None:
        return f"learner {learner.name!r} has a post other than the residual LayerNorm"
    if backend == "cpu":
        return None  # interpret mode runs any shape and dtype
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return f"inputs in {jnp.dtype(dtype).name} (float32 or bfloat16 only)"
    if backend != "gpu":
        return f"no Pallas kernel for backend {backend!r} (GPU only)"
    widths = [W0[w].shape[-1] for w, _ in learner.dense]
    sizes = {"mini_batch": mini_batch, "d_in": d_in, "d_out": d_out,
             **{f"width of layer {i + 1}": w for i, w in enumerate(widths)}}
    for name, n in sizes.items():
        if not _pow2(n) or n < 16:
            return f"{name} = {n} (Triton needs powers of 2 >= 16)"
    return None


# ----------------------------------------------------------------------------- the step (2-D math)


_NN, _NT, _TN = ((1,), (0,)), ((1,), (1,)), ((0,), (0,))  # a b, a bᵀ, aᵀ b


def _mm_raw(a, b, contract, dtype):
    full = jnp.dtype(dtype).itemsize >= 4  # float32 at full precision (Triton's default: TF32)
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                               precision=jax.lax.Precision.HIGHEST if full else None,
                               preferred_element_type=jnp.promote_types(dtype, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mm(a, b, contract, dtype):
    """A 2-D matmul with operands in `dtype` and float32 accumulation, whose backward matmuls
    take the same operand dtype (autodiff would mix a float32 cotangent with a bfloat16 operand,
    which Triton's dot refuses)."""
    return _mm_raw(a, b, contract, dtype)


def _mm_fwd(a, b, contract, dtype):
    return _mm_raw(a, b, contract, dtype), (a, b)


def _mm_bwd(contract, dtype, res, ct):
    a, b = res
    if contract == _NN:  # c = a b
        da, db = _mm_raw(ct, b, _NT, dtype), _mm_raw(a, ct, _TN, dtype)
    elif contract == _NT:  # c = a bᵀ
        da, db = _mm_raw(ct, b, _NN, dtype), _mm_raw(ct, a, _TN, dtype)
    else:  # c = aᵀ b
        da, db = _mm_raw(b, ct, _NT, dtype), _mm_raw(a, ct, _NN, dtype)
    return da.astype(a.dtype), db.astype(b.dtype)


_mm.defvjp(_mm_fwd, _mm_bwd)


def _matmul(a, b, contract, spec):
    # a custom_vjp call does not lower to Triton: the forward kernel calls the plain matmul
    return (_mm if spec.grad else _mm_raw)(a, b, contract, spec.dot_dtype)


def _dot(a, b, spec):  # a (m, k) @ b (k, n)
    return _matmul(a, b, _NN, spec)


def _nt(a, b, spec):  # a (m, k), b (n, k) -> a bᵀ (m, n)
    return _matmul(a, b, _NT, spec)


def _tn(a, b, spec):  # a (k, m), b (k, n) -> aᵀ b (m, n)
    return _matmul(a, b, _TN, spec)


def _ln_stats(x, eps):
    """x (r, d) -> x̂ (r, d), ρ (r, 1): the statistics of `primitives.layer_norm_stats`."""
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    rho = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    return xc * rho, rho


def _ln_backward(dxhat, xhat, rho):
    """`primitives.layer_norm_backward` on (r, d) rows."""
    centred = dxhat - jnp.mean(dxhat, axis=-1, keepdims=True)
    return (centred - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True)) * rho


def _unpack(spec, ws):
    """Flat list of state leaves -> per layer (W, b or None)."""
    out, i = [], 0
    for _, b_name in spec.dense:
        w = ws[i]
        i += 1
        bias = None
        if b_name is not None:
            bias, i = ws[i], i + 1
        out.append((w, bias))
    return out


def _keys(spec, layers, fixed, k, v):
    """Keys' side: per-layer inputs X_l (b, d_l), pre-activations, and gradients G_l."""
    act = spec.activation
    Xs, Zs = [k], []
    for l, (w, bias) in enumerate(layers):
        if l > 0:
            Xs.append(act(Zs[-1]))
        Z = _dot(Xs[-1], w, spec)  # (b, d_l) @ (d_l, d_{l+1})
        Zs.append(Z if bias is None else Z + bias)
    Z = Zs[-1]
    if spec.ln_eps is None:
        G = Z - v
    else:  # f = k + LN(Z)·scale + bias: G is the LN backward of the residual, times the scale
        scale, shift = fixed
        xhat, rho = _ln_stats(Z, spec.ln_eps)
        G = _ln_backward((xhat * scale + shift + k - v) * scale, xhat, rho)
    Gs = [G]
    for l in range(len(layers) - 1, 0, -1):
        back = _nt(Gs[0], layers[l][0], spec)  # (b, d_{l+1}) @ (d_l, d_{l+1})ᵀ
        _, slope = jax.jvp(act, (Zs[l - 1],), (jnp.ones_like(Zs[l - 1]),))
        Gs.insert(0, back * slope)
    return Xs, Gs


def _update(spec, layers, Xs, Gs, e):
    """W_l ← W_l − X_lᵀ (e ⊙ G_l), b_l ← b_l − Σ_j e_j G_l,j; e (b, 1) the carrying η row."""
    ws = []
    for (w, bias), X, G in zip(layers, Xs, Gs, strict=True):
        eG = e * G  # (b, d_{l+1}): rows scaled by η_{b−1, j}
        ws.append(w - _tn(X, eG, spec).astype(w.dtype))  # (b, d_l)ᵀ @ (b, d_{l+1})
        if bias is not None:
            ws.append(bias - jnp.sum(eG, axis=0, keepdims=True).astype(bias.dtype))
    return ws


def advance(spec, ws, fixed, k, v, e):
    """The state after one mini-batch (what the backward's recomputation needs)."""
    layers = _unpack(spec, ws)
    Xs, Gs = _keys(spec, layers, fixed, k, v)
    return _update(spec, layers, Xs, Gs, e)


def step(spec, ws, fixed, q, k, v, eta, e):
    """One mini-batch of one head: (next state leaves, z (b, d_out)).

    q, k (b, d_in); v (b, d_out); eta (b, b) masked; e (b, 1) = η_{b−1, j} as a column.
    """
    layers = _unpack(spec, ws)
    act = spec.activation
    Xs, Gs = _keys(spec, layers, fixed, k, v)
    Z = None
    for l, (w, bias) in enumerate(layers):
        X = q if l == 0 else act(Z)
        A = eta * _nt(X, Xs[l], spec)  # η ⊙ (X_q X_kᵀ): (b, b)
        if bias is not None:
            A = A + eta
        Z = _dot(X, w, spec) - _dot(A, Gs[l], spec)  # (b, d_l) @ (d_l, d_{l+1}) − (b, b) @ (b, ·)
        if bias is not None:
            Z = Z + bias
    if spec.ln_eps is not None:
        scale, shift = fixed
        Z = q + _ln_stats(Z, spec.ln_eps)[0] * scale + shift
    return _update(spec, layers, Xs, Gs, e), Z


# ----------------------------------------------------------------------------- the kernels


def _rows(m, b):
    return pl.ds(pl.multiple_of(m * b, b), b)


def _barrier(spec):
    """Make a program's buffer writes visible to all its threads before they read them back."""
    if not spec.interpret:
        from jax.experimental.pallas import triton as plgpu

        plgpu.debug_barrier()


def _forward_kernel(spec, n_leaves, n_fixed, *refs):
    w0 = refs[:n_leaves]
    fixed_refs = refs[n_leaves : n_leaves + n_fixed]
    q_ref, k_ref, v_ref, eta_ref, e_ref = refs[n_leaves + n_fixed : n_leaves + n_fixed + 5]
    outs = refs[n_leaves + n_fixed + 5 :]
    z_ref, save, w_last = outs[0], outs[1 : 1 + n_leaves], outs[1 + n_leaves :]
    b, k = spec.b, spec.save_every
    fixed = tuple(r[...] for r in fixed_refs)

    def group(g, ws):
        for ref, w in zip(save, ws, strict=True):
            r = w.shape[0]
            ref[pl.ds(pl.multiple_of(g * r, r), r), :] = w

        def one(j, ws):
            rows = _rows(g * k + j, b)
            ws, z = step(spec, ws, fixed, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                         eta_ref[rows, :], e_ref[rows, :])
            z_ref[rows, :] = z.astype(z_ref.dtype)
            return ws

        return jax.lax.fori_loop(0, k, one, ws)

    ws = jax.lax.fori_loop(0, spec.groups, group, [r[...] for r in w0])
    for ref, w in zip(w_last, ws, strict=True):
        ref[...] = w


def _backward_kernel(spec, n_leaves, n_fixed, *refs):
    save = refs[:n_leaves]
    fixed_refs = refs[n_leaves : n_leaves + n_fixed]
    i = n_leaves + n_fixed
    q_ref, k_ref, v_ref, eta_ref, e_ref, dz_ref = refs[i : i + 6]
    dw_last = refs[i + 6 : i + 6 + n_leaves]
    outs = refs[i + 6 + n_leaves :]
    dq_ref, dk_ref, dv_ref, deta_ref, de_ref = outs[:5]
    dw0 = outs[5 : 5 + n_leaves]
    dfixed_refs = outs[5 + n_leaves : 5 + n_leaves + n_fixed]
    scratch = outs[5 + n_leaves + n_fixed :]  # k states of the group being walked back
    b, k = spec.b, spec.save_every
    fixed = tuple(r[...] for r in fixed_refs)

    def load(ref, j, r):  # state j of a stacked buffer of states of r rows
        return ref[pl.ds(pl.multiple_of(j * r, r), r), :]

    heights = [ref.shape[0] for ref in dw_last]  # rows of each state leaf
    spec_grad = spec._replace(grad=True)

    def inputs(m):
        rows = _rows(m, b)
        return q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], eta_ref[rows, :], e_ref[rows, :]

    def group(i, carry):
        g = spec.groups - 1 - i
        ws = [load(ref, g, r) for ref, r in zip(save, heights, strict=True)]
        if k > 1:  # recompute the group's states into the scratch buffer
            def rec(j, ws):
                for ref, w in zip(scratch, ws, strict=True):
                    r = w.shape[0]
                    ref[pl.ds(pl.multiple_of(j * r, r), r), :] = w
                q, kk, v, _, e = inputs(g * k + j)
                return advance(spec, ws, fixed, kk, v, e)

            jax.lax.fori_loop(0, k, rec, ws)
            _barrier(spec)

        def back(jj, carry):
            dws, dfix = carry
            j = k - 1 - jj
            m = g * k + j
            w_m = ws
            if k > 1:
                w_m = [load(ref, j, r) for ref, r in zip(scratch, heights, strict=True)]
            x = inputs(m)
            _, pullback = jax.vjp(lambda w, f, *x_: step(spec_grad, w, f, *x_), w_m, fixed, *x)
            dw_m, dfix_m, dq, dk, dv, deta, de = pullback((dws, dz_ref[_rows(m, b), :]))
            rows = _rows(m, b)
            for ref, val in ((dq_ref, dq), (dk_ref, dk), (dv_ref, dv), (deta_ref, deta),
                             (de_ref, de)):
                ref[rows, :] = val.astype(ref.dtype)
            return list(dw_m), tuple(a + c for a, c in zip(dfix, dfix_m, strict=True))

        carry = jax.lax.fori_loop(0, k, back, carry)
        if k > 1:
            _barrier(spec)  # the next group overwrites the scratch buffer
        return carry

    dws0 = [r[...] for r in dw_last]
    dfix0 = tuple(jnp.zeros_like(f) for f in fixed)
    dws, dfix = jax.lax.fori_loop(0, spec.groups, group, (dws0, dfix0))
    for ref, val in zip(dw0, dws, strict=True):
        ref[...] = val.astype(ref.dtype)
    for ref, val in zip(dfixed_refs, dfix, strict=True):
        ref[...] = val.astype(ref.dtype)


def _spec_bh(shape):
    """BlockSpec of a (B, H, r, c) array: program (i, j) sees its (r, c) block."""
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *shape[2:]), lambda i, j: (i, j, 0, 0))


def _spec_h(shape):
    """BlockSpec of a per-head (H, r, c) array."""
    return pl.BlockSpec((pl.squeezed, *shape[1:]), lambda i, j: (j, 0, 0))


def _call(spec, kernel, ins, in_specs, out_shapes, grid):
    params = None
    if not spec.interpret:
        from jax.experimental.pallas import triton as plgpu

        params = plgpu.CompilerParams(num_warps=4, num_stages=1)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=[_spec_bh(s.shape) for s in out_shapes],
        out_shape=out_shapes, interpret=spec.interpret, compiler_params=params,
        name=kernel.func.__name__.strip("_"),
    )(*ins)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused(spec, ws, fixed, q, k, v, eta, e):
    """z (B, H, P, d_out) and the final state leaves (B, H, r, c) of the padded sequence.

    ws: state leaves (B, H, r, c) (biases (B, H, 1, d)); fixed: () or (scale, shift) each
    (H, 1, d_out); q, k (B, H, P, d_in); v (B, H, P, d_out); eta (B, H, P, b) masked rows;
    e (B, H, P, 1) the carrying η row of each token's mini-batch, as a column.
    """
    return _fused_fwd(spec, ws, fixed, q, k, v, eta, e)[0]


def _fused_fwd(spec, ws, fixed, q, k, v, eta, e):
    B, H, P, _ = q.shape
    S = spec.groups
    z_dtype = jnp.promote_types(q.dtype, ws[0].dtype)
    out_shapes = [jax.ShapeDtypeStruct((B, H, P, v.shape[-1]), z_dtype)]
    out_shapes += [jax.ShapeDtypeStruct((B, H, S * w.shape[2], w.shape[3]), w.dtype) for w in ws]
    out_shapes += [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in ws]
    ins = [*ws, *fixed, q, k, v, eta, e]
    in_specs = [_spec_bh(w.shape) for w in ws] + [_spec_h(f.shape) for f in fixed]
    in_specs += [_spec_bh(x.shape) for x in (q, k, v, eta, e)]
    kernel = functools.partial(_forward_kernel, spec, len(ws), len(fixed))
    outs = _call(spec, kernel, ins, in_specs, out_shapes, (B, H))
    n = len(ws)
    z, saved, w_last = outs[0], outs[1 : 1 + n], outs[1 + n :]
    return (z, list(w_last)), (saved, fixed, q, k, v, eta, e)


def _fused_bwd(spec, res, cts):
    saved, fixed, q, k, v, eta, e = res
    dz, dw_last = cts
    B, H = q.shape[:2]
    sd = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    out_shapes = [sd(x) for x in (q, k, v, eta, e)] + [sd(w) for w in dw_last]
    out_shapes += [jax.ShapeDtypeStruct((B, H, *f.shape[1:]), f.dtype) for f in fixed]
    if spec.save_every > 1:
        out_shapes += [jax.ShapeDtypeStruct((B, H, spec.save_every * w.shape[2], w.shape[3]),
                                            w.dtype) for w in dw_last]
    ins = [*saved, *fixed, q, k, v, eta, e, dz.astype(jnp.promote_types(dz.dtype, q.dtype)),
           *dw_last]
    in_specs = [_spec_bh(w.shape) for w in saved] + [_spec_h(f.shape) for f in fixed]
    in_specs += [_spec_bh(x.shape) for x in (q, k, v, eta, e, dz)]
    in_specs += [_spec_bh(w.shape) for w in dw_last]
    kernel = functools.partial(_backward_kernel, spec, len(saved), len(fixed))
    outs = _call(spec, kernel, ins, in_specs, out_shapes, (B, H))
    n = len(saved)
    dq, dk, dv, deta, de = outs[:5]
    dws = list(outs[5 : 5 + n])
    dfixed = tuple(jnp.sum(d, axis=0) for d in outs[5 + n : 5 + n + len(fixed)])  # over B
    return dws, dfixed, dq, dk, dv, deta, de


fused.defvjp(_fused_fwd, _fused_bwd)


def ttt_dual_pallas(learner, W0, fixed, q, k, v, eta_m, *, save_every=SAVE_EVERY,
                    interpret=None):
    """The dual form by the fused kernel: same results as `ttt.ops.ttt.ttt_dual`.

    W0 leaves (B, H, ...); fixed {"scale", "bias"} (H, d_out) or None; q, k (B, H, N, d_in);
    v (B, H, N, d_out); eta_m (B, H, M, b, b) the masked η matrices (`_scan.eta_matrix`).
    Returns z (B, H, N, d_out) and W_N (leaves (B, H, ...)). interpret: None = on a CPU.
    """
    B, H, N, _ = q.shape
    M, b = eta_m.shape[2], eta_m.shape[3]
    k_ = max(1, min(save_every, M))
    S = -(-M // k_)
    P = S * k_ * b  # padded tokens: whole groups of whole mini-batches
    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    spec = Spec(tuple(learner.dense), learner.activation, learner.ln_eps, b, S, k_,
                jnp.dtype(q.dtype), bool(interpret))
    names = spec.leaf_names()
    # the state as 2-D leaves: biases (B, H, d) -> (B, H, 1, d)
    ws = [W0[n] if W0[n].ndim == 4 else W0[n][:, :, None, :] for n in names]
    fix = ()
    if learner.ln_eps is not None:
        fix = tuple(fixed[n][:, None, :].astype(ws[0].dtype) for n in ("scale", "bias"))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, P - x.shape[2]), (0, 0)])  # zero tokens
    eta_p = jnp.pad(eta_m, [(0, 0), (0, 0), (0, S * k_ - M), (0, 0), (0, 0)])  # zero η
    rows = eta_p.reshape(B, H, P, b)  # (B, H, P, b): token t's row of its mini-batch's η
    e = eta_p[:, :, :, -1, :].reshape(B, H, P, 1)  # (B, H, P, 1): η_{b−1, j} of token j
    z, w_last = fused(spec, ws, fix, pad(q), pad(k), pad(v), rows, e)
    W_N = {n: (w if W0[n].ndim == 4 else w[:, :, 0, :]) for n, w in zip(names, w_last,
                                                                      strict=True)}
    return z[:, :, :N], W_N
