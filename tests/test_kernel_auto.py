"""kernel="auto" picks the fused Pallas kernel only on a backend where it has been validated on
hardware (`ttt.ops.kernels.ttt_dual.VALIDATED_BACKENDS`, empty until a GPU run passes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ttt.ops import learners
from ttt.ops import ttt as ttt_module
from ttt.ops.kernels import ttt_dual as K


def _case():
    learner = learners.linear(bias=True)
    d, b, n = 16, 16, 32
    W0 = jax.tree.map(lambda a: a[None], learner.init(jax.random.PRNGKey(0), d))
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = (jax.random.normal(kk, (1, 1, n, d)) for kk in keys)
    eta = jnp.full((1, 1, n, b), 0.01)
    return learner, W0, q, k, v, eta, b


def _uses_kernel(monkeypatch) -> list:
    calls = []
    real = ttt_module.ttt_dual_pallas

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ttt_module, "ttt_dual_pallas", spy)
    return calls


def test_no_backend_is_validated_yet():
    assert K.VALIDATED_BACKENDS == frozenset()
    for backend in ("gpu", "cpu", "tpu"):
        assert not K.auto_selects(backend)


def test_auto_runs_xla_where_the_kernel_is_not_validated(monkeypatch):
    calls = _uses_kernel(monkeypatch)
    learner, W0, q, k, v, eta, b = _case()
    ttt_module.ttt(learner, W0, q, k, v, eta, mini_batch=b, form="dual", kernel="auto")
    assert calls == []


def test_auto_runs_the_kernel_where_it_is_validated(monkeypatch):
    """The negative control: with this backend marked validated, "auto" takes the kernel (here
    interpreted on the CPU) and gives the XLA dual form's answer."""
    monkeypatch.setattr(K, "VALIDATED_BACKENDS", frozenset({jax.default_backend()}))
    calls = _uses_kernel(monkeypatch)
    learner, W0, q, k, v, eta, b = _case()
    z, _ = ttt_module.ttt(learner, W0, q, k, v, eta, mini_batch=b, form="dual", kernel="auto")
    assert calls == [1]
    z_xla, _ = ttt_module.ttt(learner, W0, q, k, v, eta, mini_batch=b, form="dual", kernel="xla")
    assert jnp.max(jnp.abs(z - z_xla)) < 1e-5


@pytest.mark.parametrize("kernel", ["pallas"])
def test_pallas_is_still_available_by_name(monkeypatch, kernel):
    calls = _uses_kernel(monkeypatch)
    learner, W0, q, k, v, eta, b = _case()
    ttt_module.ttt(learner, W0, q, k, v, eta, mini_batch=b, form="dual", kernel=kernel)
    assert calls == [1]
