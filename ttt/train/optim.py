"""The outer-loop optimizer: the paper recipe (TTT-LM §3 / docs/design.md §10.3).

AdamW(b1=0.9, b2=0.95), weight decay 0.1 (optionally on matrices only), global-norm clipping at 1.0,
learning rate warmed up linearly from 0 and decayed with a cosine to `end_lr`. Separately, the
TTT-MLP inner base learning rate is warmed up 0.01 -> 0.1 over the same warm-up steps; the layers
take that as a multiplier `ttt_lr_mult` in [0.1, 1] on their own base rate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up 0 -> `lr` over `warmup_steps`, then cosine to `end_lr` at `total_steps`."""
    warmup = int(optim_config.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, float(optim_config.lr), warmup, max(int(total_steps), warmup + 1),
        end_value=float(optim_config.end_lr))


def ttt_lr_mult_schedule(optim_config) -> optax.Schedule:
    """Multiplier for the inner base learning rate at outer step `step` (a traced scalar).

    With `optim.ttt_mlp_lr_warmup` the multiplier rises linearly from
    `ttt_lr_mult_init` (0.1: base lr 0.1 -> 0.01) to 1 over the outer warm-up; otherwise it is 1.
    """
    if not optim_config.get("ttt_mlp_lr_warmup", False):
        return lambda step: jnp.float32(1.0)
    init = float(optim_config.get("ttt_lr_mult_init", 0.1))
    warmup = int(optim_config.warmup_steps)
    if warmup <= 0:
        return lambda step: jnp.float32(1.0)
    return optax.linear_schedule(init, 1.0, warmup)


# Parameters never decayed, by leaf name: the decay rates and time steps of the gated mixers
# (A_log, dt_bias) and Mamba2's skip D. Decay would pull A_log to 0 (A = 1) and dt_bias to 0
# (Δ = log 2) whatever the data says; the Mamba2 and Gated DeltaNet recipes exclude them too.
NO_DECAY = ("A_log", "dt_bias", "D")


def weight_decay_mask(params, which: str):
    """Pytree of bools: which parameters are decayed ("all", or "matrices": ndim >= 2), never
    the NO_DECAY leaves."""
    if which not in ("all", "matrices"):
        raise ValueError(f"optim.weight_decay_mask must be 'all' or 'matrices', got {which!r}")

    def decayed(path, p):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in NO_DECAY and (which == "all" or p.ndim >= 2)

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip) then AdamW with the warm-up + cosine schedule."""
    if optim_config.name != "adamw":
        raise ValueError(f"optim.name: only 'adamw' is supported, got {optim_config.name!r}")
    which = optim_config.get("weight_decay_mask", "all")
    adamw = optax.adamw(
        lr_schedule(optim_config, total_steps),
        b1=float(optim_config.b1),
        b2=float(optim_config.b2),
        eps=float(optim_config.get("eps", 1e-8)),
        weight_decay=float(optim_config.weight_decay),
        mask=lambda params: weight_decay_mask(params, which),
    )
    parts = [adamw]
    if optim_config.get("clip", 0.0):
        parts.insert(0, optax.clip_by_global_norm(float(optim_config.clip)))
    return optax.chain(*parts)
