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

import os
from typing import Any, NamedTuple

import ml_collections as mlc

from ttt import extensions
from ttt.config import REQUIRED, ConfigError
from ttt.train.checkpoint import restore_params
from ttt.train.setup import abstract_params
from ttt.train.workdir import read_config


class Run(NamedTuple):
    model: Any
    params: Any
    config: mlc.ConfigDict
    step: int


def read_run_config(workdir: str) -> mlc.ConfigDict:
    """The run's saved config; ConfigError (one line) for a config.json that is JSON but not a
    config `python -m ttt.main` wrote (a list, a number, or a dict without the run's sections)."""
    path = os.path.join(workdir, "config.json")
    not_a_run = (f"{path} is JSON but not a run config written by python -m ttt.main; point "
                 "--workdir at a run directory")
    try:
        config = read_config(workdir)
    except (TypeError, AttributeError):
        raise ConfigError(not_a_run) from None
    for section, keys in REQUIRED.items():
        if not isinstance(config.get(section), mlc.ConfigDict):
            raise ConfigError(f"{not_a_run} (no {section} section)")
        missing = [k for k in keys if k not in config[section]]
        if missing:
            raise ConfigError(f"{not_a_run} (no {section}.{missing[0]})")
    return config


def load(workdir: str, step: int | None = None) -> Run:
    """`load_run` plus the checkpoint's step."""
    config = read_run_config(workdir)
    extensions.load_from_config(config)  # the run's own learners / mixers (`--import`)
    try:
        model, target = abstract_params(config)
    except ConfigError:
        raise
    except (KeyError, AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"{workdir}/config.json does not build a model ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); was it written by "
                          "python -m ttt.main?") from None
    params, step = restore_params(workdir, target, step)
    return Run(model, params, config, step)


def load_run(workdir: str, step: int | None = None):
    """(model, params, config) of the run in `workdir`: the Flax module built from its saved
    config, the parameters of its newest checkpoint (or `step`) on one device, and the config."""
    run = load(workdir, step)
    return run.model, run.params, run.config
