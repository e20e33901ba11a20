"""ttt.layers: Flax sequence mixers with one interface, and the registry that names them.

`make_mixer(name, width, num_heads, **kwargs)` builds any mixer in `MIXERS`; every mixer maps
x (B, N, C) -> (y (B, N, C), aux) and the causal ones decode with init_cache / prefill / step.
"""

from ttt.layers.attention import LinearAttention, SoftmaxAttention
from ttt.layers.common import CausalConv, LayerNorm
from ttt.layers.mttt_layer import MTTTMixer
from ttt.layers.registry import MIXERS, accepted_kwargs, make_mixer
from ttt.layers.ttt_layer import TTTMixer

__all__ = [
    "MIXERS",
    "CausalConv",
    "LayerNorm",
    "LinearAttention",
    "MTTTMixer",
    "SoftmaxAttention",
    "TTTMixer",
    "accepted_kwargs",
    "make_mixer",
]
