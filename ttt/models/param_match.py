"""Parameter-matched LM sizes: the SwiGLU width at which a block with one mixer holds as many
parameters as a block with another (by default the Transformer's softmax attention).

A `CausalLM` block is always mixer + SwiGLU FFN. Mixers wider than attention's four C×C maps
(Mamba2's in-projection to z, x, B, C, dt and its E×C out-projection, about 6 C²; Gated DeltaNet
with value heads of 2d, about 8 C²) keep their papers' configuration, and the FFN next to them
narrows by the difference: (extra mixer parameters) / 3C, rounded to a multiple of 16 (the
SwiGLU has three C×F maps). Everything else in the model (embedding, norms, depth) is the preset's,
so the whole model then matches the Transformer up to the rounding.

Counts come from `jax.eval_shape` of one block's init: exact, nothing allocated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ttt import layers
from ttt.models.build import param_count
from ttt.models.lm import Block


@functools.cache
def block_params(mixer: str, width: int, num_heads: int, ffn_dim: int,
                 mixer_kwargs: tuple = ()) -> int:
    """Parameters of one LM block (norms, the pre-conv where the mixer's entry has one, the mixer,
    the SwiGLU of hidden width ffn_dim). mixer_kwargs: sorted (key, value) pairs."""
    spec = layers.mixer_spec(mixer)
    pre_conv = spec.pre_conv(spec.attrs(**dict(mixer_kwargs)))
    block = Block(width, num_heads, ffn_dim, mixer, tuple(mixer_kwargs), pre_conv=pre_conv)
    h = jnp.zeros((1, 1, width), jnp.float32)
    return param_count(jax.eval_shape(block.init, jax.random.PRNGKey(0), h, 1.0))


def matched_ffn_dim(mixer: str, width: int, num_heads: int, ffn_dim: int, *,
                    mixer_kwargs=None, reference: str = "softmax", multiple: int = 16) -> int:
    """The SwiGLU hidden width F' for which a block with `mixer` (and mixer_kwargs) has the
    parameters of a `reference` block with hidden width ffn_dim, rounded to `multiple`.

    ValueError when the mixer alone holds more than the reference block (no FFN width fits)."""
    kwargs = tuple(sorted(dict(mixer_kwargs or {}).items()))
    extra = (block_params(mixer, width, num_heads, 1, kwargs)
             - block_params(reference, width, num_heads, 1))
    hidden = multiple * round((ffn_dim - extra / (3 * width)) / multiple)
    if hidden < multiple:
        raise ValueError(f"{mixer!r} at width {width} holds more parameters than a {reference!r} "
                         f"block with ffn_dim {ffn_dim}; no FFN width matches it")
    return int(hidden)
