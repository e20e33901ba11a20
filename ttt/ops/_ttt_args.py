"""Argument checks shared by the causal TTT forms (`ttt.ops.ttt`) and their reference loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt.ops import checks


def head_shapes(learner, W0, q, v, fixed, what="W0"):
    """Check W0/fixed against the learner; return True when W0 leads with (B, H), False for (H,)."""
    B, H, _, d_in = q.shape
    per_sequence = checks.inner_state_layout(learner, W0, B, H, d_in, what)
    if fixed is not None:
        checks.check_leading("fixed", fixed, (H,), "(H,)")
    lead = 2 if per_sequence else 1
    W_head = jax.tree_util.tree_map(
        lambda w: jax.ShapeDtypeStruct(jnp.shape(w)[lead:], jnp.result_type(w)), W0
    )
    fixed_head = jax.tree_util.tree_map(
        lambda f: jax.ShapeDtypeStruct(jnp.shape(f)[1:], jnp.result_type(f)), fixed
    )
    token = jax.ShapeDtypeStruct((d_in,), q.dtype)
    try:
        out = jax.eval_shape(learner.apply, W_head, token, fixed_head)
    except Exception as err:  # re-raised in words: what was passed, not an XLA trace
        raise ValueError(
            f"learner {learner.name}: apply(W, x, fixed) fails on one token of width {d_in} "
            f"with W0/fixed as given: {err}"
        ) from err
    if tuple(out.shape) != (v.shape[-1],):
        raise ValueError(
            f"v: learner {learner.name} maps d_in={d_in} to {tuple(out.shape)}, but v has "
            f"d_out={v.shape[-1]}"
        )
    return per_sequence


def check_sequence(q, k, v, eta, mini_batch):
    """Check q, k, v, eta, mini_batch (contract of ttt_primal/ttt_dual)."""
    checks.check_int("mini_batch", mini_batch, 1)
    checks.check_qkv(q, k, v)
    B, H, N, _ = q.shape
    if jnp.ndim(eta) == 3:
        checks.check_shape("eta", eta, (B, H, N), "(B, H, N)", like="q")
    elif jnp.ndim(eta) == 4:
        checks.check_shape("eta", eta, (B, H, N, mini_batch), "(B, H, N, b)", like="q, mini_batch")
    else:
        raise ValueError(
            f"eta: expected (B, H, N) per-token or (B, H, N, b) per-row learning rates, "
            f"got shape {jnp.shape(eta)}"
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("eta", eta)):
        checks.check_floating(name, x)
    checks.check_same_dtype(q=q, k=k, v=v)


def check_dual(learner, W0):
    """The dual form needs a dense-chain learner whose W holds exactly the chain's layers."""
    if getattr(learner, "dense", None) is None:
        raise ValueError(
            f"ttt_dual: learner {learner.name!r} has no dense-chain description (learner.dense "
            f"is None); use ttt_primal, or ttt(..., form='auto')"
        )
    names = {n for layer in learner.dense for n in layer if n is not None}
    if not isinstance(W0, dict) or set(W0) != names:
        raise ValueError(
            f"ttt_dual: learner {learner.name!r} declares dense layers {learner.dense}, but W0 has "
            f"keys {sorted(W0) if isinstance(W0, dict) else type(W0).__name__}"
        )


def check_log_alpha(log_alpha, q):
    """log_alpha: None or (B, H, N) floating log-decays <= 0."""
    if log_alpha is None:
        return
    checks.check_shape("log_alpha", log_alpha, q.shape[:3], "(B, H, N)", like="q")
    checks.check_floating("log_alpha", log_alpha)
    checks.check_log_decay("log_alpha", log_alpha)


def check_gate_kernel(kernel, log_alpha):
    if kernel == "pallas" and log_alpha is not None:
        raise ValueError("kernel='pallas' takes no forget gate (log_alpha); use kernel='xla' or "
                         "'auto'")
