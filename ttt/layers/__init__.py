"""ttt.layers: Flax sequence mixers with one interface, and the registry that names them.

`make_mixer(name, width, num_heads, **kwargs)` builds any mixer in `MIXERS`; every mixer maps
x (B, N, C) -> (y (B, N, C), aux) and the causal ones decode with init_cache / prefill / step.
`MIXERS[name]` is a `MixerSpec`: causality, non-causal twin, pre-conv, state size and FLOPs;
`register_mixer(MixerSpec(...))` adds one (docs/extending.md).
"""

from ttt.layers.attention import LinearAttention, SoftmaxAttention
from ttt.layers.common import CausalConv, LayerNorm
from ttt.layers.delta_layer import DeltaNetMixer
from ttt.layers.lact_layer import LaCTMixer
from ttt.layers.mamba2_layer import Mamba2Mixer
from ttt.layers.mttt_layer import MTTTMixer
from ttt.layers.registry import (
    MIXERS,
    MixerSpec,
    accepted_kwargs,
    forward_flops,
    make_mixer,
    mixer_spec,
    register_mixer,
    state_size,
)
from ttt.layers.ttt_layer import TTTMixer
from ttt.layers.window_layer import SlidingWindowAttention

__all__ = [
    "MIXERS",
    "CausalConv",
    "DeltaNetMixer",
    "LaCTMixer",
    "LayerNorm",
    "LinearAttention",
    "MTTTMixer",
    "Mamba2Mixer",
    "MixerSpec",
    "SlidingWindowAttention",
    "SoftmaxAttention",
    "TTTMixer",
    "accepted_kwargs",
    "forward_flops",
    "make_mixer",
    "mixer_spec",
    "register_mixer",
    "state_size",
]
