"""A TTT LM initialised from a trained softmax-attention LM of the same size (the trainer's
`config.init.transformer_workdir`, `ttt.train.init`): embeddings, norms, feed-forwards and Q/K/V/O
projections are copied, the TTT-only parameters keep their initial values. In a hybrid stack
the softmax-attention layers take the transformer's layer whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ttt.interop.trees import flatten, lm_model, lm_target, nest
from ttt.models import stack_layers, unstack_layers
from ttt.models.hybrid import layer_mixers

__all__ = ["init_ttt_from_transformer"]

_SHARED_MIXER_PARAMS = ("wq", "wk", "wv", "wo")


def init_ttt_from_transformer(ttt_config, transformer_variables: Mapping, *,
                              seed: int = 0) -> tuple[nn.Module, dict]:
    """A TTT LM started from a trained softmax-attention LM of the same dimensions.

    TTT-LM §2 motivates it: softmax attention is the kernel-regression limit of TTT (Theorem 2),
    and both read the same q, k, v projections. `ttt_config` (a model_config or a built
    CausalLM) names the TTT variant; its parameters are initialised with `seed`, then every path
    outside the mixers (embeddings, RMSNorms, SwiGLU feed-forwards, a pre-conv if both have one)
    and the mixers' wq/wk/wv/wo kernels are overwritten by the transformer's. TTT-only parameters
    (W0, ttt_norm, η gate and offsets, post_norm, wg, conv_q/conv_k) keep their initial values;
    transformer parameters without a TTT counterpart (wk under the Mamba backbone, biases) are
    dropped. In a hybrid stack (`model.pattern`) the layers whose mixer is softmax attention
    copy all of the transformer's layer, the others its wq/wk/wv/wo where they have them.
    Scanned or unrolled layouts on either side. Returns (model, {"params": ...}).
    """
    model = lm_model(ttt_config)
    ids = jnp.zeros((1, 1), jnp.int32)
    unit = layer_mixers(model)
    # both sides in the unrolled layout (h/<i>/...), the model's own restored at the end
    theirs = flatten(unstack_layers(dict(transformer_variables.get("params",
                                                                   transformer_variables))))
    target = flatten(unstack_layers(lm_target(model)))
    shared, problems = [], []
    for path, leaf in target.items():
        parts = path.split("/")
        if "seq_modeling_block" in parts:
            attention = parts[0] == "h" and unit[int(parts[1]) % len(unit)].mixer == "softmax"
            if not attention and \
                    parts[parts.index("seq_modeling_block") + 1] not in _SHARED_MIXER_PARAMS:
                continue  # TTT-only: keeps its initial value
        if path not in theirs:
            if not (parts[0] == "h" and "conv" in parts[1:3]):
                problems.append(f"missing {path}")  # only a pre-conv may be TTT-only
        elif np.shape(theirs[path]) != leaf.shape:
            problems.append(f"{path}: {np.shape(theirs[path])} vs {leaf.shape}")
        else:
            shared.append(path)
    if problems:
        raise ValueError("init_ttt_from_transformer: the transformer is not the same size as the "
                         "TTT model: " + "; ".join(problems[:10]))
    params = flatten(unstack_layers(jax.jit(model.init)(jax.random.PRNGKey(seed), ids)["params"]))
    for path in shared:
        params[path] = jnp.asarray(theirs[path], params[path].dtype)
    new = nest(params)
    if model.scan_layers:
        new = stack_layers(new, unit=len(unit))
    return model, {"params": new}
