"""ttt: test-time-training sequence layers (TTT-Linear, TTT-MLP, MTTT) in JAX/Flax."""

__version__ = "0.1.0"
