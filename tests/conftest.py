"""Shared test fixtures and the relative-error assertion used across the suite."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled (restored afterwards)."""
    with jax.enable_x64(True):
        yield


def rel_err(actual, expected) -> float:
    """max |a - e| / max(max |e|, tiny): one number that reads the same at every scale."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: {a.shape} vs {e.shape}")
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-30)
    return float(np.max(np.abs(a - e))) / scale if a.size else 0.0


def assert_close(actual, expected, rtol: float, what: str = "") -> float:
    """Assert every leaf of two pytrees agrees to `rtol` relative error; return the worst error."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
    if len(leaves_a) != len(leaves_e):
        raise AssertionError(f"{what}: pytrees differ ({tree_a} vs {tree_e})")
    worst = 0.0
    for (path, a), e in zip(leaves_a, leaves_e, strict=True):
        err = rel_err(a, e)
        worst = max(worst, err)
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64))
        assert err <= rtol, (
            f"{what}{jax.tree_util.keystr(path)}: relative error {err:.3e} > {rtol:.1e} "
            f"(max abs diff {diff.max():.3e}, mean abs diff {diff.mean():.3e})"
        )
    return worst
