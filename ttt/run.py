"""Use a trained run: `ttt.load_run(workdir) -> (model, params, config)`.

The run's `config.json` (the resolved config the trainer wrote) rebuilds the model with
`ttt.models.build_model`; the parameters come from the newest readable checkpoint (or `step`),
restored onto one device without reading the optimizer state:

    model, params, config = ttt.load_run("/tmp/lm")
    logits, aux = model.apply({"params": params}, input_ids)          # (B, N, V)
    tokens = ttt.models.generate(model, {"params": params}, prompt, 32, key=key)

`python -m ttt.sample` and `python -m ttt.evaluate` are built on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections as mlc

from ttt.train.checkpoint import restore_params
from ttt.train.setup import abstract_params
from ttt.train.workdir import read_config


class Run(NamedTuple):
    model: Any
    params: Any
    config: mlc.ConfigDict
    step: int


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
