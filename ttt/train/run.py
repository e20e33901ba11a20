"""Use a trained run: `ttt.load_run(workdir) -> (model, params, config)`.

The run's `config.json` (the resolved config the trainer wrote) rebuilds the model with
`ttt.models.build_model`; the parameters come from the newest readable checkpoint (or `step`),
restored onto one device without reading the optimizer state:

    model, params, config = ttt.load_run("/tmp/lm")
    logits, aux = model.apply({"params": params}, input_ids)          # (B, N, V)
    tokens = ttt.models.generate(model, {"params": params}, prompt, 32, key=key)

`python -m ttt.sample` and `python -m ttt.evaluate` are built on it, and so are the trainer's
`config.init.from_workdir` / `transformer_workdir` starts.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

from ttt.config import ConfigError

log = logging.getLogger(__name__)


class Run(NamedTuple):
    model: Any
    params: Any
    config: mlc.ConfigDict
    step: int


def read_config(workdir: str) -> mlc.ConfigDict:
    """The resolved config a run saved in `workdir/config.json`."""
    if not os.path.isdir(workdir):
        raise ConfigError(f"{workdir}: no such run directory")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir} holds no config.json: not a directory written by "
                          "python -m ttt.main")
    try:
        with open(path) as f:
            return mlc.ConfigDict(json.load(f))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} does not read as JSON ({err})") from None


def abstract_params(config):
    """(model, parameter tree of ShapeDtypeStructs) for a resolved run config; nothing allocated.

    Built exactly as the trainer builds them (same task, same dummy batch), so the paths match
    the checkpoints'."""
    from ttt.models import build_model
    from ttt.train import steps
    from ttt.train.compile_only import abstract_meta
    from ttt.train.train import dummy_batch

    try:
        model = build_model(config.model)
    except ValueError as err:
        raise ConfigError(f"config.model: {err}") from None
    task = steps.make_task(config, model)
    batch = dummy_batch(config, abstract_meta(config))
    return model, jax.eval_shape(task.init, jax.random.PRNGKey(0),
                                 jax.tree.map(jnp.asarray, batch))


def restore_params(workdir: str, target, step: int | None = None) -> tuple[Any, int]:
    """(parameters of `workdir`'s checkpoint `step` (newest readable when None), its step).

    `target`: the parameter tree as abstract arrays; the result lands on the first local device.
    Nothing in `workdir` is written or moved (an unreadable checkpoint is skipped with a warning).
    """
    from ttt.train.checkpoint import Checkpointer, CheckpointMismatchError

    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise ConfigError(f"{workdir} has no checkpoints/ yet: train it first")
    ckpt = Checkpointer(directory, read_only=True, async_save=False)
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), target)
    try:
        available = ckpt.all_steps()
        if step is not None and step not in available:
            raise ConfigError(f"{workdir} has no checkpoint {step} (it has {available})")
        for candidate in [step] if step is not None else available[::-1]:
            try:
                return ckpt.restore_params(candidate, target), candidate
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 — an unreadable step: try the previous one
                log.warning("checkpoint %s/%d could not be read (%s: %s)", directory, candidate,
                            type(err).__name__, (str(err).splitlines() or [""])[0][:200])
        raise ConfigError(f"{workdir} has no readable checkpoint (steps: {available})")
    finally:
        ckpt.close()


def load(workdir: str, step: int | None = None) -> Run:
    """`load_run` plus the checkpoint's step."""
    config = read_config(workdir)
    model, target = abstract_params(config)
    params, step = restore_params(workdir, target, step)
    return Run(model, params, config, step)


def load_run(workdir: str, step: int | None = None):
    """(model, params, config) of the run in `workdir`: the Flax module built from its saved
    config, the parameters of its newest checkpoint (or `step`) on one device, and the config."""
    run = load(workdir, step)
    return run.model, run.params, run.config
