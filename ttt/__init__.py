"""ttt: test-time-training sequence layers (TTT-Linear, TTT-MLP, MTTT) in JAX/Flax.

`ttt.load_run(workdir) -> (model, params, config)` loads a trained run (see `ttt.run`).
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazily, so `import ttt.config` (the command lines' first step) does not import JAX.
    if name == "load_run":
        from ttt.run import load_run

        return load_run
    raise AttributeError(f"module 'ttt' has no attribute {name!r}")
