"""Config validation shared by the CLI and the trainer: fail before anything compiles, in one line
that names the key to change (`ConfigError("config.train.global_batch_size=6: ...")`).
"""

from __future__ import annotations

import dataclasses
import math

from ttt.errors import ConfigError  # the one error type, re-exported for the callers

MESH_AXES = ("data", "fsdp", "model")
PARALLEL_MODES = ("single", "pmap", "mesh")
REQUIRED = {
    "model": ("kind", "mixer"),
    "data": ("name",),
    "optim": ("name", "lr", "end_lr", "warmup_steps", "b1", "b2", "weight_decay"),
    "train": ("steps", "global_batch_size", "seed", "parallel"),
}


def _get(section, key, default=None):
    return section.get(key, default) if hasattr(section, "get") else default


def model_dims(model_config) -> tuple[int | None, int | None]:
    """(width, num_heads): the explicit model fields, else the preset's (None if neither)."""
    from ttt.models.presets import model_sizes  # imported here: validating flags needs no JAX

    sizes = model_sizes(model_config)
    return sizes["width"], sizes["num_heads"]


def _check_mixer(model) -> None:
    """The mixer name for the model kind (registry), then its kwargs and values (the module)."""
    from ttt.layers import make_mixer  # imported here: validating flags alone needs no JAX
    from ttt.models.build import model_mixer

    try:
        name = model_mixer(model.kind, model.mixer)
    except ValueError as err:
        reason = str(err).removeprefix("model.mixer: ")
        raise ConfigError(f"config.model.mixer={model.mixer!r}: {reason}") from None
    if _get(model, "pattern", None):  # a hybrid stack: its own names and per-mixer kwargs
        from ttt.models.hybrid import check_pattern

        try:
            check_pattern(model)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"config.model.pattern={model.pattern!r}: "
                              f"{str(err).removeprefix('model.pattern: ')}") from None
        return
    width, heads = model_dims(model)
    kwargs = dict(_get(model, "mixer_kwargs", None) or {})
    try:
        make_mixer(name, width or 16, heads or 1, **kwargs)
    except ValueError as err:
        raise ConfigError(f"config.model.mixer={model.mixer!r}: {err}") from None
    except TypeError as err:
        raise ConfigError(f"config.model.mixer_kwargs={kwargs}: {err}") from None


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes (data, fsdp, model); one size of -1 takes what the others leave.

    A mesh that does not fit `num_devices` is a ValueError naming the axis to change, and how to
    try the mesh on this machine (`--compile_only --simulate_devices=N`)."""
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    shown = dict(zip(MESH_AXES, sizes, strict=True))
    known = math.prod(s for s in sizes if s != -1)
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.train.mesh {shown}: sizes must be positive, with at most one "
                         "-1 (the axis that takes the devices the others leave)")
    fits = num_devices % known == 0 if -1 in sizes else known == num_devices
    if not fits:
        raise ValueError(f"config.train.mesh {shown} does not fit {num_devices} devices: "
                         f"{_mesh_fix(sizes, num_devices)}; to try this mesh on this machine, "
                         f"add --compile_only --simulate_devices={known}")
    return tuple(num_devices // known if s == -1 else s for s in sizes)


def _mesh_fix(sizes: list[int], num_devices: int) -> str:
    """The change of one axis that makes `sizes` fit `num_devices` (data first)."""
    free = -1 in sizes
    for i, axis in enumerate(MESH_AXES):
        if sizes[i] == -1:
            continue
        others = math.prod(s for j, s in enumerate(sizes) if j != i and s != -1)
        if num_devices % others:
            continue
        room = num_devices // others
        if not free:
            return f"set --config.train.mesh.{axis}={room} (or -1)"
        best = max(v for v in range(1, min(sizes[i], room) + 1) if room % v == 0)
        return f"set --config.train.mesh.{axis}={best} (a divisor of {room})"
    return f"set --config.train.mesh.data=-1 with fsdp x model dividing {num_devices}"


def model_parallel(train, num_devices: int) -> int:
    """The size of the `model` mesh axis (1 unless train.parallel is 'mesh')."""
    if train.parallel != "mesh":
        return 1
    return mesh_shape(train.mesh, num_devices)[2]


def replicas(train, num_devices: int) -> int:
    """How many ways the global batch is split for `train.parallel`."""
    if train.parallel == "single":
        return 1
    if train.parallel == "pmap":
        return num_devices
    try:
        data, fsdp, _ = mesh_shape(train.mesh, num_devices)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return data * fsdp


def validate(config, *, num_devices: int | None = None, process_count: int | None = None) -> None:
    """Raise ConfigError for the first problem found; device counts default to the live ones."""
    for section, keys in REQUIRED.items():
        if section not in config:
            raise ConfigError(f"config.{section}: missing section")
        for key in keys:
            if key not in config[section]:
                raise ConfigError(f"config.{section}.{key}: missing")
    check_run_settings(config)
    model, data, optim, train = config.model, config.data, config.optim, config.train
    if model.kind not in ("lm", "vit"):
        raise ConfigError(f"config.model.kind={model.kind!r}: must be 'lm' or 'vit'")
    width, heads = model_dims(model)
    if width is not None and heads is not None and (heads <= 0 or width % heads):
        raise ConfigError(f"config.model.num_heads={heads}: must divide the width {width}")
    mini_batch = (_get(model, "mixer_kwargs", None) or {}).get("mini_batch")
    if mini_batch is not None:
        # 0 means one mini-batch spanning the whole sequence (batch GD, the TTT-LM ablation rung)
        if isinstance(mini_batch, bool) or not isinstance(mini_batch, int) or mini_batch < 0:
            raise ConfigError(f"config.model.mixer_kwargs.mini_batch={mini_batch!r}: must be a "
                              "positive integer, or 0 for one mini-batch over the whole sequence")
    _check_mixer(model)
    if not data.name:
        raise ConfigError("config.data.name: no dataset named")
    if optim.name != "adamw":
        raise ConfigError(f"config.optim.name={optim.name!r}: only 'adamw' is supported")
    if _get(optim, "weight_decay_mask", "all") not in ("all", "matrices"):
        raise ConfigError(f"config.optim.weight_decay_mask={optim.weight_decay_mask!r}: must be "
                          "'all' or 'matrices'")
    if not 0 <= optim.warmup_steps <= train.steps:
        raise ConfigError(f"config.optim.warmup_steps={optim.warmup_steps}: must lie in "
                          f"[0, train.steps={train.steps}]")
    if train.parallel not in PARALLEL_MODES:
        raise ConfigError(f"config.train.parallel={train.parallel!r}: must be one of "
                          f"{', '.join(PARALLEL_MODES)}")
    if num_devices is None or process_count is None:
        import jax

        num_devices = jax.device_count() if num_devices is None else num_devices
        process_count = jax.process_count() if process_count is None else process_count
    if train.parallel == "single" and process_count > 1:
        raise ConfigError("config.train.parallel='single': runs with several processes need "
                          "'pmap' or 'mesh'")
    n = replicas(train, num_devices)
    tensor = model_parallel(train, num_devices)
    if tensor > 1 and heads is not None and heads % tensor:
        raise ConfigError(f"config.train.mesh.model={tensor}: must divide the {heads} heads of "
                          f"config.model.num_heads (head parallelism splits whole heads); pick a "
                          f"divisor of {heads}")
    batch, accum = train.global_batch_size, _get(train, "grad_accum", 1)
    if batch % (n * process_count if train.parallel == "single" else math.lcm(n, process_count)):
        raise ConfigError(f"config.train.global_batch_size={batch}: must be divisible by the "
                          f"{n} data-parallel replicas of parallel={train.parallel!r}")
    if accum < 1 or (batch // n) % accum:
        raise ConfigError(f"config.train.grad_accum={accum}: must divide the per-replica batch "
                          f"{batch // n}")


# ---------------------------------------------------------------- the run around the model
# Counts of config.train and the optional config.init section (where a run's weights start from).

INIT_SOURCES = ("from_workdir", "transformer_workdir", "official_checkpoint")


@dataclasses.dataclass(frozen=True)
class Domain:
    """The values a numeric config field accepts: `kind` (int or float; bools never count),
    bounds (`low_open` / `high_open` exclude them), `none` (None allowed: left to the preset or
    the dataset, or "off") and `also` (extra values such as a mesh axis's -1). Floats are finite."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False
    also: tuple = ()
    note: str = ""

    def describe(self) -> str:
        """'a float in (0, inf)'-style text for messages and field listings."""
        kind = "an integer" if self.kind is int else "a finite number"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        text = (f"{kind} in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}"
                f"{')' if self.high_open or self.high is None else ']'}")
        extra = [repr(v) for v in self.also] + (["None"] if self.none else [])
        text += f" (or {' or '.join(extra)})" if extra else ""
        return text + (f"; {self.note}" if self.note else "")

    def reason(self, value) -> str | None:
        """None when `value` lies in the domain, else what it must be."""
        if value is None and self.none or value in self.also:
            return None
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or \
                not math.isfinite(value):
            return f"must be {self.describe()}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open
                                           else value > self.high)
        return f"must be {self.describe()}" if below or above else None

    def outside(self) -> list:
        """Values just outside the domain (the table-driven test feeds each to the checks)."""
        out = [self.kind(self.low) if self.low_open else self.low - 1] if self.low is not None \
            else []
        if self.high is not None:
            out.append(self.kind(self.high) if self.high_open else self.high + 1)
        out = [v for v in out if v not in self.also]
        out += [float("nan"), float("inf")] if self.kind is float else [1.5]
        return out + ([] if self.none else [None])


def _count(low: int = 1, **kw) -> Domain:
    return Domain(int, low, **kw)


def _real(low: float = 0.0, high: float | None = None, **kw) -> Domain:
    return Domain(float, low, high, **kw)


_SIZE = _count(1, none=True, note="None: the preset's (or the dataset's)")
_AXIS = _count(1, also=(-1,), note="-1: the devices the other axes leave")

# Every numeric field of the shipped configs (and the optional keys a run accepts), with its
# domain: checked before anything is built or compiled (`check_domains`), one line naming the field.
DOMAINS: dict[str, Domain] = {
    **{f"model.{k}": _SIZE for k in ("num_layers", "width", "num_heads", "ffn_dim", "mlp_dim",
                                     "vocab_size", "num_classes", "image_size", "channels")},
    "model.patch_size": _count(0, note="0: every pixel is a token"),
    "data.seq_len": _count(1),
    "data.vocab_size": _count(1, none=True),
    "data.num_kv_pairs": _count(1),
    "data.test_seq_len": _count(1, none=True),
    "data.test_num_kv_pairs": _count(1, none=True),
    "data.num_train_examples": _count(1),
    "data.num_test_examples": _count(1),
    "data.power_a": _real(0.0, low_open=True, note="the MQAR gap power law's exponent"),
    "optim.lr": _real(0.0, low_open=True),
    "optim.end_lr": _real(0.0),
    "optim.warmup_steps": _count(0),
    "optim.b1": _real(0.0, 1.0, high_open=True),
    "optim.b2": _real(0.0, 1.0, high_open=True),
    "optim.eps": _real(0.0, low_open=True),
    "optim.clip": _real(0.0, none=True, note="0 or None: no clipping"),
    "optim.weight_decay": _real(0.0),
    "optim.ttt_lr_mult_init": _real(0.0, low_open=True),
    "train.steps": _count(1),
    "train.global_batch_size": _count(1),
    "train.seed": _count(0),
    "train.grad_accum": _count(1),
    "train.log_every": _count(1),
    "train.diag_every": _count(1),
    "train.checkpoint_every": _count(1),
    "train.keep_checkpoints": _count(1),
    "train.keep_every": _count(1, none=True, note="None: no milestones"),
    "train.eval_every": _count(0, note="0: no evaluation"),
    "train.eval_steps": _count(1),
    "train.stop_at": _count(0, note="0: run to train.steps"),
    "train.fsdp_min_size": _count(0),
    "train.label_smoothing": _real(0.0, 1.0, high_open=True),
    "train.mixup_alpha": _real(0.0),
    **{f"train.mesh.{k}": _AXIS for k in MESH_AXES},
    "paper_perplexity": _real(0.0, low_open=True, none=True, note="the paper's reported value"),
}


def _lookup(config, dotted: str):
    """(found, value) of a dotted key in a ConfigDict / dict."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_domains(config) -> None:
    """ConfigError naming the first field of DOMAINS whose value lies outside its domain."""
    for key, domain in DOMAINS.items():
        found, value = _lookup(config, key)
        if found:
            reason = domain.reason(value)
            if reason:
                raise ConfigError(f"config.{key}={value!r}: {reason}")


# Optional keys the trainer reads with a default, by section; with_defaults adds the missing ones
# so that every setting can be given on the command line (--config.train.stop_at=100).
OPTIONAL = {
    "train": {"stop_at": 0, "grad_accum": 1, "log_every": 50, "checkpoint_every": 1000,
              "keep_checkpoints": 3, "async_checkpoints": True, "eval_every": 0, "eval_steps": 1,
              "progress": True, "label_smoothing": 0.0, "mixup_alpha": 0.0},
    "optim": {"eps": 1e-8, "clip": 0.0, "weight_decay_mask": "all", "ttt_mlp_lr_warmup": False,
              "ttt_lr_mult_init": 0.1},
    "data": {"eval_split": "validation"},
}


# Keys a section may gain on the command line although the config file does not set them: the
# data keys of every data.name (switching --config.data.name=text_files needs data.paths), and the
# model's optional pre-conv switch and hybrid pattern. Anything else must already be in the file.
ADDABLE = {
    "data": ("name", "seq_len", "tokenizer", "paths", "data_dir", "dataset", "text_key", "splits",
             "vocab_size", "num_kv_pairs", "test_seq_len", "test_num_kv_pairs",
             "train_num_kv_pairs", "power_a", "random_filler", "num_train_examples",
             "num_test_examples", "test_seed",
             "image_size", "flip", "crop_frac", "pixels", "randaug", "mixup", "shuffle_windows",
             "num_threads", "prefetch", "eval_split", "repeats", "repeat_span",
             "repeat_min_distance", "repeat_max_distance"),
    "model": ("pre_conv", "pattern"),
}


def with_defaults(config):
    """A copy of `config` with the optional settings every run accepts added where absent: the
    `init` section (where a new run's weights come from) and the OPTIONAL keys, so that any of them
    can be set on the command line (`--config.init.from_workdir=DIR`) of any experiment file."""
    import copy

    from ml_collections import config_dict

    config = copy.deepcopy(config)  # keeps placeholders (typed None fields) as they are
    with config.unlocked():
        if "init" not in config:
            config.init = config_dict.ConfigDict(
                {k: config_dict.placeholder(str) for k in INIT_SOURCES})
        for section, keys in OPTIONAL.items():
            if section in config:
                for key, value in keys.items():
                    if key not in config[section]:
                        config[section][key] = value
    return config


def check_run_settings(config) -> None:
    """One-line ConfigError for a field outside its domain (DOMAINS) or a bad config.init."""
    import os

    check_domains(config)
    init = _get(config, "init", None) or {}
    chosen = [k for k in INIT_SOURCES if _get(init, k)]
    if len(chosen) > 1:
        raise ConfigError(f"config.init: set one of {', '.join(chosen)}, not several")
    for key in chosen:
        path = os.path.expanduser(str(init[key]))
        exists = os.path.isfile(path) if key == "official_checkpoint" else os.path.isdir(path)
        if not exists:
            what = "file" if key == "official_checkpoint" else "run directory"
            raise ConfigError(f"config.init.{key}={init[key]!r}: no such {what}")
