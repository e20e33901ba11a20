"""ttt.ops: the math as pure jax.numpy functions on per-head arrays (B, H, N, d).

- primitives: LayerNorm, the causal depthwise convolution, RoPE (one copy each in the package).
- learners:   inner models f(x; W) as (init, apply) pairs (linear, MLP, x + LN(f_res(x))).
- ttt:        causal mini-batch TTT (TTT-LM): primal, dual (fast), naive (reference), decode step.
- ttt_state:  the causal TTT state machine: training forward, prefill, one-token step, the η
              construction and the inner-loss diagnostics.
- mttt:       multi-step non-causal TTT (MTTT) with per-step inner losses.
- inner_opt:  inner optimizers (optax transforms: SGD, momentum, Muon, Adam) and causal TTT driven
              by one, its state in the recurrent state.
- lact:       large-chunk TTT (LaCT): one fast-weight update per chunk, causal or not, decode step.
- attention:  softmax attention, Nadaraya–Watson kernel regression, linear attention, sliding-window
              attention.
- checks:     the argument checks every level uses (errors in words, not XLA traces).

`ttt.ops.ttt`, `ttt.ops.mttt`, `ttt.ops.ttt_state` and `ttt.ops.lact` stay the submodules: the
functions of those names live there.
"""

from ttt.ops.attention import (
    exp_kernel,
    kernel_regression,
    linear_attention,
    linear_attention_decode_step,
    linear_attention_init_state,
    softmax_attention,
    window_attention,
)
from ttt.ops.learners import (
    Learner,
    gelu_tanh,
    init_fixed_ln,
    inner_loss,
    linear,
    ln_residual,
    mlp,
    reconstruction_loss,
    swiglu,
    weighted_grads,
)
from ttt.ops.mttt import sgd_chunks
from ttt.ops.primitives import causal_conv, layer_norm, rope
from ttt.ops.ttt import ttt_decode_step, ttt_dual, ttt_naive, ttt_primal
from ttt.ops.ttt_state import TTTState

__all__ = [
    "Learner",
    "TTTState",
    "causal_conv",
    "exp_kernel",
    "gelu_tanh",
    "init_fixed_ln",
    "inner_loss",
    "kernel_regression",
    "layer_norm",
    "linear",
    "linear_attention",
    "linear_attention_decode_step",
    "linear_attention_init_state",
    "ln_residual",
    "mlp",
    "reconstruction_loss",
    "rope",
    "sgd_chunks",
    "softmax_attention",
    "swiglu",
    "ttt_decode_step",
    "ttt_dual",
    "ttt_naive",
    "ttt_primal",
    "weighted_grads",
    "window_attention",
]
