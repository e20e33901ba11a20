"""One registry of sequence mixers: a name picks a module class and its default attributes.

`make_mixer(name, width, num_heads, **kwargs)` validates everything before any tracing: unknown
names and unknown keyword arguments fail with the accepted ones listed; the modules' own
`__post_init__` checks the values (width % heads, even head dim for RoPE, option spellings).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from ttt.layers.attention import LinearAttention, SoftmaxAttention
from ttt.layers.mttt_layer import MTTTMixer
from ttt.layers.ttt_layer import TTTMixer

# name -> (module class, default attributes). Causal LM mixers first, then the vision ones.
MIXERS: dict[str, tuple[type[nn.Module], dict]] = {
    "ttt_linear": (TTTMixer, {"learner": "linear", "base_lr": 1.0, "mini_batch": 16}),
    "ttt_mlp": (TTTMixer, {"learner": "mlp", "base_lr": 0.1, "mini_batch": 16}),
    "ttt_linear_mamba": (TTTMixer, {"learner": "linear", "backbone": "mamba", "base_lr": 1.0}),
    "ttt_mlp_mamba": (TTTMixer, {"learner": "mlp", "backbone": "mamba", "base_lr": 0.1}),
    "linear_attention": (LinearAttention, {"causal": True}),
    "softmax": (SoftmaxAttention, {"causal": True}),
    "mttt_linear": (MTTTMixer, {"learner": "linear"}),
    "mttt_mlp": (MTTTMixer, {"learner": "mlp"}),
    "linear_attention_noncausal": (
        LinearAttention,
        {"causal": False, "normalize": "adaptive", "feature_map": "elu", "use_bias": True},
    ),
    "softmax_noncausal": (SoftmaxAttention, {"causal": False, "rope": False, "use_bias": True}),
}

# attributes every mixer takes positionally or that Flax manages itself
_RESERVED = {"width", "num_heads", "parent", "name"}


def accepted_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments `make_mixer(name, ...)` accepts (the module's attributes)."""
    cls, _ = _lookup(name)
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in _RESERVED)


def _lookup(name: str):
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(MIXERS)}")
    return MIXERS[name]


def make_mixer(name: str, width: int, num_heads: int, **kwargs) -> nn.Module:
    """Build the mixer `name` with `width` C and `num_heads` H; kwargs override its defaults.

    Returns an unbound Flax module with `__call__(x (B, N, C), *, ttt_lr_mult=1.0, train=False)
    -> (y (B, N, C), aux)`; causal mixers also have init_cache / prefill / step.
    """
    cls, defaults = _lookup(name)
    accepted = accepted_kwargs(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"mixer {name!r} ({cls.__name__}) got unknown argument(s) {unknown}; accepted: "
            f"{', '.join(accepted)}"
        )
    return cls(width=width, num_heads=num_heads, **{**defaults, **kwargs})
