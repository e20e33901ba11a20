"""ttt.ops: the math as pure jax.numpy functions on per-head arrays (B, H, N, d).

- primitives:   LayerNorm, the causal depthwise convolution, RoPE, the attention ops' causal mask
                (one copy each in the package).
- learners:     inner models f(x; W) as (init, apply) pairs (linear, MLP, x + LN(f_res(x))) and
                the learner registry (`register_learner`: the names the layers accept).
- ttt:          causal mini-batch TTT (TTT-LM): primal, dual (fast), naive (reference), decode step.
- ttt_state:    the causal TTT state machine: training forward, prefill, one-token step, the η
                construction and the inner-loss diagnostics.
- mttt:         multi-step non-causal TTT (MTTT) with per-step inner losses.
- inner_opt:    inner optimizers (optax transforms: SGD, momentum, Muon, Adam) and causal TTT
                driven by one, its state in the recurrent state.
- lact:         large-chunk TTT (LaCT): one fast-weight update per chunk, causal or not, decode
                step.
- softmax_attn: softmax attention and Nadaraya–Watson kernel regression (its exp-kernel case).
- delta:        the (gated) delta rule: exact chunked (WY/UT) form, recurrent reference, decode
                step.
- titans:       Titans' memory: test-time GD with per-token momentum and forgetting (chunk form,
                token loop, decode).
- linear_attn:  linear attention (quadratic, cumsum and chunked forms) and its decode step.
- window_attn:  sliding-window softmax attention (flash-style backward), its decode step and ring
                cache.
- checks:       the argument checks every level uses (errors in words, not XLA traces).

`ttt.ops.ttt`, `ttt.ops.mttt`, `ttt.ops.ttt_state` and `ttt.ops.lact` stay the submodules: the
functions of those names live there. The attention modules end in `_attn` so that the functions
re-exported here (`linear_attention`, ...) do not shadow them.
"""

from ttt.ops.delta import delta_rule, delta_rule_decode_step, delta_rule_recurrent
from ttt.ops.learners import (
    Learner,
    build_learner,
    gelu_tanh,
    init_fixed_ln,
    inner_loss,
    learner_names,
    linear,
    ln_residual,
    mlp,
    reconstruction_loss,
    register_learner,
    swiglu,
    weighted_grads,
)
from ttt.ops.linear_attn import (
    linear_attention,
    linear_attention_decode_step,
    linear_attention_init_state,
)
from ttt.ops.mttt import sgd_chunks
from ttt.ops.primitives import causal_conv, layer_norm, rope
from ttt.ops.softmax_attn import exp_kernel, kernel_regression, softmax_attention
from ttt.ops.ttt import ttt_decode_step, ttt_dual, ttt_naive, ttt_primal
from ttt.ops.ttt_state import TTTState
from ttt.ops.window_attn import window_attention

__all__ = [
    "Learner",
    "TTTState",
    "build_learner",
    "causal_conv",
    "delta_rule",
    "delta_rule_decode_step",
    "delta_rule_recurrent",
    "exp_kernel",
    "gelu_tanh",
    "init_fixed_ln",
    "inner_loss",
    "kernel_regression",
    "layer_norm",
    "learner_names",
    "linear",
    "linear_attention",
    "linear_attention_decode_step",
    "linear_attention_init_state",
    "ln_residual",
    "mlp",
    "reconstruction_loss",
    "register_learner",
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
