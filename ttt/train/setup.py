"""What the driver, the compile-only report and a run's loader share: the model, optimizer,
placement and pure step functions built from a config, and their abstract (shape-only) state.

`resolve_config(config, meta)` fills the dataset-dependent model fields and the preset's sizes;
`build_setup(config, meta, build_model)` returns a `Setup` (model, optimizer, placement, a pure
state constructor, the steps); `abstract_state(setup)` and `abstract_params(config)` are their
`jax.eval_shape` trees (nothing allocated); `lower_train_step(setup)` lowers the jitted step on
abstract arguments; `abstract_meta(config)` is the dataset meta the model needs, from the config
when it names the model's vocabulary / image fields, else from the data pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttt.config import ConfigError, check_domains
from ttt.data import meta as data_meta
from ttt.models import build_model, without_diagnostics
from ttt.models.presets import model_sizes
from ttt.train import optim as optim_lib
from ttt.train import parallel, steps


@dataclasses.dataclass
class Setup:
    """Everything derived from the config before any array is allocated."""

    config: Any
    task: steps.Task
    tx: Any
    placement: Any
    create_state: Callable[..., steps.TrainState]  # pure; run under jit by the placement
    train_step: Callable  # partial of steps.train_step: the default step, no diagnostics pass
    eval_step: Callable  # partial of steps.eval_step
    diag_step: Callable | None  # the step that also computes the diagnostics (None: the same)
    ttt_lr_fn: Callable
    dummy_batch: dict  # one global batch of zeros with the real shapes and dtypes
    items_per_step: int
    unit: str


def dummy_batch(config, meta: dict) -> dict:
    """Zeros shaped like one global batch (for init and lowering; never trained on)."""
    b = config.train.global_batch_size
    if config.model.kind == "lm":
        n = meta["seq_len"]
        return {"inputs": np.zeros((b, n), np.int32), "targets": np.zeros((b, n), np.int32),
                "mask": np.ones((b, n), np.float32)}
    return {"images": np.zeros((b, *meta["image_shape"]), np.float32),
            "labels": np.zeros((b,), np.int32)}


def resolve_config(config, meta: dict):
    """Copy of `config` with dataset-dependent model fields (vocab, classes, image size) and the
    preset's sizes filled, so `config.json` holds the values the run used.

    ConfigError first for a field outside its domain (`ttt.config.DOMAINS`) and for a model whose
    vocabulary (classes) is smaller than the dataset's: ids past the embedding would be clamped
    or read as NaN by the loss, not refused."""
    check_domains(config)
    check_fits_data(config, meta)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        if config.model.kind == "lm" and config.model.get("vocab_size") is None:
            config.model.vocab_size = int(meta["vocab_size"])
        if config.model.kind == "vit":
            if config.model.get("num_classes") is None:
                config.model.num_classes = int(meta["num_classes"])
            if config.model.get("image_size") is None:
                config.model.image_size = int(meta["image_shape"][0])
            if config.model.get("channels") is None:
                config.model.channels = int(meta["image_shape"][2])
        for key, value in model_sizes(config.model).items():  # the preset's, where left None
            if key in config.model and config.model[key] is None:
                config.model[key] = value
    return config


def check_fits_data(config, meta: dict) -> None:
    """ConfigError unless the model's vocabulary (LM) / classes (ViT) cover the dataset's."""
    field, key = ("vocab_size", "vocab_size") if config.model.kind == "lm" else \
        ("num_classes", "num_classes")
    ours, theirs = config.model.get(field), meta.get(key)
    if ours is not None and theirs is not None and int(ours) < int(theirs):
        raise ConfigError(f"config.model.{field}={ours}: smaller than the dataset's {theirs} "
                          f"({config.data.name}); set it to at least {theirs}, or leave it None "
                          "to take the dataset's")


def build_setup(config, meta: dict, build_model) -> Setup:
    """Model, task, optimizer, placement and the pure step functions for `config`."""
    total = int(config.train.steps)
    model = build_model(config.model)
    task = steps.make_task(config, model)
    # The diagnostics (the TTT layer's inner-loss statistics) cost an extra inner pass: they run
    # only on the steps that log them; every other step and evaluation run the plain model.
    diag_task, task = task, task._replace(model=without_diagnostics(model))
    tx = optim_lib.make_optimizer(config.optim, total)
    lr_fn = optim_lib.lr_schedule(config.optim, total)
    ttt_lr_fn = optim_lib.ttt_lr_mult_schedule(config.optim)
    batch = dummy_batch(config, meta)

    def create_state(params=None):
        """A step-0 state; `params` (host arrays, e.g. from config.init) replace the init."""
        params_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.train.seed))
        if params is None:
            params = task.init(params_rng, jax.tree.map(jnp.asarray, batch))
        return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params), rng=step_rng)

    lm = config.model.kind == "lm"
    step = functools.partial(steps.train_step, tx=tx, lr_fn=lr_fn, ttt_lr_fn=ttt_lr_fn,
                             grad_accum=int(config.train.get("grad_accum", 1)))
    return Setup(
        config=config, task=task, tx=tx, placement=parallel.make_placement(config),
        create_state=create_state, train_step=functools.partial(step, task=task),
        eval_step=functools.partial(steps.eval_step, task=task),
        diag_step=(None if diag_task.model is task.model
                   else functools.partial(step, task=diag_task)),
        ttt_lr_fn=ttt_lr_fn, dummy_batch=batch,
        items_per_step=config.train.global_batch_size * (meta["seq_len"] if lm else 1),
        unit="tokens" if lm else "images")


def abstract_state(setup: Setup):
    """The TrainState as ShapeDtypeStructs (no memory)."""
    return jax.eval_shape(setup.create_state)


def lower_train_step(setup: Setup):
    """Lower the jitted train step on abstract global arguments (mesh / single placements)."""
    state = abstract_state(setup)
    if setup.placement.mode == "mesh":
        state = setup.placement.restore_target(state)
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=setup.placement.batch_sharding), setup.dummy_batch)
    else:
        batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.dummy_batch)
    return setup.placement.compile_train(setup.train_step).lower(state, batch)


def abstract_meta(config) -> dict:
    """The dataset meta the model needs, from the config if it names the model's vocabulary /
    image fields (paper configs do), else from the data pipeline."""
    model, data = config.model, config.data
    if model.kind == "lm" and model.get("vocab_size") and data.get("seq_len"):
        return {"vocab_size": int(model.vocab_size), "seq_len": int(data.seq_len)}
    if model.kind == "vit" and model.get("num_classes") and model.get("image_size") and \
            model.get("channels"):
        s = int(model.image_size)
        return {"num_classes": int(model.num_classes), "image_shape": (s, s, int(model.channels))}
    try:
        return data_meta(data)
    except Exception as err:
        raise ConfigError(f"config.data: {err} (compile_only needs the dataset's meta; set "
                          "config.model.vocab_size / num_classes, image_size, channels to skip "
                          "the data)") from err


def abstract_params(config):
    """(model, parameter tree of ShapeDtypeStructs) for a resolved run config; nothing allocated.

    Built exactly as the trainer builds them (same task, same dummy batch), so the paths match
    the checkpoints'."""
    try:
        model = build_model(config.model)
    except ValueError as err:
        raise ConfigError(f"config.model: {err}") from None
    task = steps.make_task(config, model)
    batch = dummy_batch(config, abstract_meta(config))
    return model, jax.eval_shape(task.init, jax.random.PRNGKey(0),
                                 jax.tree.map(jnp.asarray, batch))
