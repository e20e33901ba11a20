"""One registry of sequence mixers: a name picks a `MixerSpec`, the facts every consumer reads.

`MIXERS[name]` is a frozen `MixerSpec`: the module class and its default attributes, its
non-causal twin's name (what a ViT uses instead), whether it is causal (has init_cache / prefill /
step), whether an LM block puts its causal pre-convolution in front of it, its recurrent state
size and its forward FLOPs (`ttt.layers.costs`). The last three are functions of the *resolved*
attributes (`spec.attrs(**kwargs)`), so they follow options such as `backbone` or `mini_batch`.

`make_mixer(name, width, num_heads, **kwargs)` validates everything before any tracing: unknown
names and unknown keyword arguments fail with the accepted ones listed; the modules' own
`__post_init__` checks the values (width % heads, even head dim for RoPE, option spellings).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from ttt.layers import costs
from ttt.layers.attention import LinearAttention, SoftmaxAttention
from ttt.layers.delta_layer import DeltaNetMixer
from ttt.layers.lact_layer import LaCTMixer
from ttt.layers.mamba2_layer import Mamba2Mixer
from ttt.layers.mttt_layer import MTTTMixer
from ttt.layers.titans_layer import TitansMixer
from ttt.layers.ttt_layer import TTTMixer
from ttt.layers.window_layer import SlidingWindowAttention

# attributes every mixer takes positionally or that Flax manages itself
_RESERVED = {"width", "num_heads", "parent", "name"}


def _never(attrs: Mapping) -> bool:
    return False


def _mamba_backbone(attrs: Mapping) -> bool:
    return attrs["backbone"] == "mamba"


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """Everything the package knows about one registry entry.

    name: the registry name. module: the Flax class; defaults: attributes the entry sets on top
    of the class's own (read-only). causal: has a decode path (init_cache / prefill / step);
    noncausal: registry name of the twin a whole-sequence model (the ViT) uses, or None.
    pre_conv(attrs): whether a CausalLM block puts its causal convolution before this mixer.
    state_size(width, heads, attrs, seq_len): recurrent state, floats per layer per sequence.
    flops(N, width, heads, attrs): forward FLOPs of one call at batch 1 (see `ttt.layers.costs`).
    """

    name: str
    module: type[nn.Module]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    causal: bool = True
    noncausal: str | None = None
    pre_conv: Callable[[Mapping], bool] = _never
    state_size: Callable[[int, int, Mapping, int], int] | None = None  # None: not stated
    flops: Callable[[int, int, int, Mapping], float] | None = None  # None: not stated
    description: str = ""  # one line for catalogues (`python -m ttt.main --list`)

    def accepted(self) -> tuple[str, ...]:
        """The keyword arguments the module takes (its attributes but width / num_heads)."""
        return tuple(f.name for f in dataclasses.fields(self.module)
                     if f.init and f.name not in _RESERVED)

    def check_kwargs(self, kwargs: Mapping) -> None:
        """ValueError listing the accepted arguments if `kwargs` has a name the module lacks."""
        accepted = self.accepted()
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"mixer {self.name!r} ({self.module.__name__}) got unknown argument(s) {unknown}; "
                f"accepted: {', '.join(accepted)}"
            )

    def attrs(self, **kwargs) -> dict[str, Any]:
        """Every attribute the module would get: class defaults < registry defaults < kwargs."""
        self.check_kwargs(kwargs)
        fields = {f.name: f for f in dataclasses.fields(self.module) if f.name in self.accepted()}
        base = {name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for name, f in fields.items()}
        return {**base, **self.defaults, **kwargs}


# module class -> (state size, forward FLOPs) from ttt.layers.costs
_COSTS = {TTTMixer: (costs.ttt_state, costs.ttt_flops),
          MTTTMixer: (costs.mttt_state, costs.mttt_flops),
          LinearAttention: (costs.linear_attention_state, costs.linear_attention_flops),
          SoftmaxAttention: (costs.softmax_state, costs.softmax_flops),
          Mamba2Mixer: (costs.mamba2_state, costs.mamba2_flops),
          LaCTMixer: (costs.lact_state, costs.lact_flops),
          DeltaNetMixer: (costs.delta_state, costs.delta_flops),
          SlidingWindowAttention: (costs.swa_state, costs.swa_flops),
          TitansMixer: (costs.titans_state, costs.titans_flops)}


def _spec(name, module, defaults, *, causal, pre_conv=_never, noncausal=None):
    return name, MixerSpec(name, module, types.MappingProxyType(defaults), causal, noncausal,
                           pre_conv, *_COSTS[module])


# Causal LM mixers first, then the vision ones.
MIXERS: dict[str, MixerSpec] = dict([
    # kernel "auto": the fused Pallas kernel of the dual form where validated on hardware, else XLA
    _spec("ttt_linear", TTTMixer, {"learner": "linear", "base_lr": 1.0, "mini_batch": 16,
                                   "kernel": "auto"}, causal=True, pre_conv=_mamba_backbone),
    _spec("ttt_mlp", TTTMixer, {"learner": "mlp", "base_lr": 0.1, "mini_batch": 16,
                                "kernel": "auto"}, causal=True, pre_conv=_mamba_backbone),
    _spec("ttt_linear_mamba", TTTMixer, {"learner": "linear", "backbone": "mamba", "base_lr": 1.0,
                                         "kernel": "auto"}, causal=True, pre_conv=_mamba_backbone),
    _spec("ttt_mlp_mamba", TTTMixer, {"learner": "mlp", "backbone": "mamba", "base_lr": 0.1,
                                      "kernel": "auto"}, causal=True, pre_conv=_mamba_backbone),
    _spec("linear_attention", LinearAttention, {"causal": True}, causal=True,
          noncausal="linear_attention_noncausal"),
    _spec("softmax", SoftmaxAttention, {"causal": True}, causal=True,
          noncausal="softmax_noncausal"),
    _spec("lact", LaCTMixer, {"causal": True}, causal=True, noncausal="lact_noncausal"),
    _spec("mamba2", Mamba2Mixer, {}, causal=True),
    _spec("deltanet", DeltaNetMixer, {"gate": False}, causal=True),
    # the paper's value heads of twice the key head dim
    _spec("gated_deltanet", DeltaNetMixer, {"gate": True, "expand_v": 2}, causal=True),
    _spec("swa", SlidingWindowAttention, {}, causal=True),
    _spec("titans", TitansMixer, {}, causal=True),
    _spec("mttt_linear", MTTTMixer, {"learner": "linear"}, causal=False),
    _spec("mttt_mlp", MTTTMixer, {"learner": "mlp"}, causal=False),
    _spec("linear_attention_noncausal", LinearAttention,
          {"causal": False, "normalize": "adaptive", "feature_map": "elu", "use_bias": True},
          causal=False),
    _spec("softmax_noncausal", SoftmaxAttention, {"causal": False, "rope": False,
                                                  "use_bias": True}, causal=False),
    _spec("lact_noncausal", LaCTMixer, {"causal": False}, causal=False),
])

SHIPPED = frozenset(MIXERS)  # the entries register_mixer never replaces


_DECODE_METHODS = ("init_cache", "prefill", "step")


def register_mixer(spec: MixerSpec, *, replace: bool = False) -> MixerSpec:
    """Add a mixer to the registry: afterwards `spec.name` works wherever a shipped name does
    (`make_mixer`, `model.mixer` and `model.pattern` in configs, experiment tokens, compare,
    bench). The module must take `width` and `num_heads` and return (y, aux) from
    `__call__(x, *, ttt_lr_mult=1.0, train=False)`; a causal one also needs init_cache / prefill /
    step; `noncausal` must name a registered non-causal entry. state_size and flops may be None
    (reports then say "n/a"). A taken name is a ValueError unless replace=True (a shipped entry
    can never be replaced). Returns the spec."""
    if not isinstance(spec, MixerSpec):
        raise ValueError(f"register_mixer: expected a MixerSpec, got {type(spec).__name__}")
    name, module = spec.name, spec.module
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"register_mixer: name {name!r} must be an identifier")
    if name in SHIPPED or (name in MIXERS and not replace):
        raise ValueError(f"register_mixer: {name!r} is already a mixer; pick another name"
                         + ("" if name in SHIPPED else " or pass replace=True"))
    if not (isinstance(module, type) and issubclass(module, nn.Module)):
        raise ValueError(f"register_mixer({name!r}): module must be a flax.linen.Module class")
    fields = {f.name for f in dataclasses.fields(module)}
    if not {"width", "num_heads"} <= fields:
        raise ValueError(f"register_mixer({name!r}): {module.__name__} must have the attributes "
                         "width and num_heads")
    missing = [m for m in _DECODE_METHODS if not callable(getattr(module, m, None))]
    if spec.causal and missing:
        raise ValueError(f"register_mixer({name!r}): a causal mixer decodes; {module.__name__} "
                         f"lacks {', '.join(missing)} (or register it with causal=False)")
    if spec.noncausal is not None and (spec.noncausal not in MIXERS
                                       or MIXERS[spec.noncausal].causal):
        raise ValueError(f"register_mixer({name!r}): noncausal={spec.noncausal!r} is not a "
                         "registered non-causal mixer; register the twin first")
    spec.check_kwargs(spec.defaults)
    frozen = dataclasses.replace(spec, defaults=types.MappingProxyType(dict(spec.defaults)))
    MIXERS[name] = frozen
    return frozen


def mixer_spec(name: str) -> MixerSpec:
    """The registry entry `name`; ValueError listing the known names otherwise."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(MIXERS)}")
    return MIXERS[name]


def accepted_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments `make_mixer(name, ...)` accepts (the module's attributes)."""
    return mixer_spec(name).accepted()


def make_mixer(name: str, width: int, num_heads: int, **kwargs) -> nn.Module:
    """Build the mixer `name` with `width` C and `num_heads` H; kwargs override its defaults.

    Returns an unbound Flax module with `__call__(x (B, N, C), *, ttt_lr_mult=1.0, train=False)
    -> (y (B, N, C), aux)`; causal mixers also have init_cache / prefill / step.
    """
    spec = mixer_spec(name)
    spec.check_kwargs(kwargs)
    return spec.module(width=width, num_heads=num_heads, **{**spec.defaults, **kwargs})


def state_size(name: str, width: int, num_heads: int, seq_len: int, **kwargs) -> int | None:
    """Recurrent state of mixer `name` (with kwargs), floats per layer per sequence (None when a
    registered mixer does not state it)."""
    spec = mixer_spec(name)
    if spec.state_size is None:
        return None
    return int(spec.state_size(width, num_heads, spec.attrs(**kwargs), seq_len))


def forward_flops(name: str, seq_len: int, width: int, num_heads: int, **kwargs) -> float | None:
    """Forward FLOPs of one call of mixer `name` (with kwargs) on seq_len tokens at batch 1 (None
    when a registered mixer does not state them)."""
    spec = mixer_spec(name)
    if spec.flops is None:
        return None
    return float(spec.flops(seq_len, width, num_heads, spec.attrs(**kwargs)))
