"""Where a new run's parameters start (`config.init`): a fresh initialisation, or one of

- `from_workdir=DIR`: the parameters of another run's newest checkpoint (the optimizer starts
  fresh, at step 0); the two models must have the same parameter names and shapes.
- `transformer_workdir=DIR`: a trained softmax-attention LM of the same size; its embeddings,
  norms, feed-forwards and Q/K/V/O projections go into this TTT LM, the TTT-only parameters keep
  their initial values (`ttt.train.transformer_init.init_ttt_from_transformer`).
- `official_checkpoint=FILE`: a ttt-lm-jax checkpoint file in its streaming msgpack format
  (`ttt.interop.load_ttt_lm_jax_checkpoint` + `import_ttt_lm_jax`).

Any mismatch is one ConfigError line naming the key and the first differing parameters. A
workdir that already holds a checkpoint resumes from it and ignores `config.init`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from ttt import interop
from ttt.config import INIT_SOURCES, ConfigError
from ttt.train.checkpoint import describe_mismatch, restore_params, signature
from ttt.train.setup import abstract_params
from ttt.train.transformer_init import init_ttt_from_transformer
from ttt.train.workdir import read_config


def chosen(config) -> tuple[str, str] | None:
    """(key, value) of the init source `config` names, or None."""
    init = config.get("init") or {}
    for key in INIT_SOURCES:
        if init.get(key):
            return key, os.path.expanduser(str(init[key]))
    return None


def _fit(params, target, where: str):
    problems = describe_mismatch(signature(params), signature(target))
    if problems:
        raise ConfigError(f"{where}: its parameters do not fit this model ({problems})")
    return jax.tree.map(lambda p, t: np.asarray(p, t.dtype), params, target)


def initial_params(config, target) -> tuple[Any, str] | None:
    """(host parameters shaped like `target`, a description) for `config.init`, or None."""
    source = chosen(config)
    if source is None:
        return None
    key, value = source
    where = f"config.init.{key}={value!r}"
    try:
        if key == "from_workdir":
            params, step = restore_params(value, target)
            return _fit(jax.device_get(params), target, where), f"the parameters of {value} " \
                f"(step {step}); a fresh optimizer"
        if key == "transformer_workdir":
            theirs = read_config(value)
            if theirs.model.mixer != "softmax":
                raise ConfigError(f"{where}: that run's mixer is {theirs.model.mixer!r}; "
                                  "a Transformer run (mixer 'softmax') is needed")
            params, step = restore_params(value, abstract_params(theirs)[1])
            _, variables = init_ttt_from_transformer(
                config.model, {"params": jax.device_get(params)}, seed=int(config.train.seed))
            return _fit(variables["params"], target, where), \
                f"the Transformer run {value} (step {step}): embeddings, norms, " \
                "feed-forwards and Q/K/V/O copied, TTT-only parameters initialised"
        if config.model.get("pattern"):
            raise ConfigError(f"{where}: a ttt-lm-jax checkpoint has one mixer in every layer; "
                              f"a hybrid stack (model.pattern={config.model.pattern!r}) cannot "
                              "start from one")
        tree = interop.load_ttt_lm_jax_checkpoint(value)
        _, variables = interop.import_ttt_lm_jax(
            tree, scan_layers=bool(config.model.get("scan_layers", True)))
        return _fit(variables["params"], target, where), \
            f"the ttt-lm-jax checkpoint {value}"
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") \
            from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{where}: {' '.join(str(err).split())}") from None
