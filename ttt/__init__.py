"""ttt: test-time-training sequence layers (TTT-Linear, TTT-MLP, MTTT) in JAX/Flax.

`ttt.load_run(workdir) -> (model, params, config)` loads a trained run (see `ttt.run`).
"""

__version__ = "0.1.0"

import os as _os


def _guard_xla_cpu() -> None:
    """Turn off XLA:CPU's YNNPACK fusions for this process (jaxlib 0.10, before JAX starts).

    In jaxlib 0.10.2 a `__ynn_fusion` that holds a matmul with a broadcast constant operand and
    a reduction after it reads memory it never wrote: `jnp.sum(jnp.square(x @ jnp.ones((32,
    32))))` returns a wrong number, inf or NaN, changing from compile to compile. The chunked
    delta rule meets it when a sequence fits in one chunk (the zero start state is such an
    operand), so DeltaNet layers at N <= 64 gave garbage or NaN. An empty
    `--xla_cpu_experimental_ynn_fusion_type` disables those fusions (docs/design.md §15.2,
    tests/test_xla_guard.py). Left alone: an XLA_FLAGS that already sets the flag, any other
    jaxlib (the flag may not exist there, and an unknown flag stops XLA), and a JAX whose
    backend started before this import (the flag is read once, at start-up).
    """
    from importlib import metadata

    try:
        if not metadata.version("jaxlib").startswith("0.10."):
            return
    except metadata.PackageNotFoundError:
        return
    flags = _os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        _os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=".strip()


_guard_xla_cpu()


def __getattr__(name):
    # Lazily, so `import ttt.config` (the command lines' first step) does not import JAX.
    if name == "load_run":
        from ttt.run import load_run

        return load_run
    raise AttributeError(f"module 'ttt' has no attribute {name!r}")
