"""Where the state and the batches live: one device, `pmap` replicas, or a `jit` mesh.

`make_placement(config)` picks one of three classes with the same methods, so the training driver
never branches on the mode:

- `place_state(create_fn)`: run the state constructor so its outputs land where they belong
  (on the mesh, parameters are born sharded: no host copy of a model that does not fit).
- `place_batch(local_batch)`: this process's rows -> the step's batch argument.
- `compile_train(step)`, `compile_eval(step)`: the wrapped step functions.
- `to_checkpoint(state)` / `restore_target(abstract)` / `from_checkpoint(state)`: global arrays for
  orbax, so a checkpoint written under one mode or device count restores under any other.

Mesh axes are (data, fsdp, model). The batch is split over data x fsdp; parameters whose path
matches a rule in `train.partition_rules` get that spec, otherwise matrices with at least
`train.fsdp_min_size` elements are split over fsdp along their largest divisible axis, and the rest
(norms, biases, the TTT inner initial state) are replicated.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ttt.config import MESH_AXES, mesh_shape

# The TTT inner model's initial state (ttt_dense_l, ttt_bias_l, the per-head ttt_norm; MTTT's W0)
# is small and read by every token of every sequence: keep it replicated.
DEFAULT_RULES = ((r"(^|/)(ttt_dense_\d+|ttt_bias_\d+|ttt_norm|W0|inner_[^/]*)(/|$)", ()),)


def path_str(path) -> str:
    """'opt_state/0/mu/Dense_0/kernel' from a jax key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def partition_spec(path: str, shape, fsdp: int, rules=DEFAULT_RULES, min_size: int = 0) -> P:
    """PartitionSpec for one array: the first matching rule, else fsdp on the largest axis."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return P(*spec)
    if fsdp == 1 or len(shape) < 2 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


class _JitPlacement:
    """What the `jit` placements share: checkpoints hold the state as placed, metrics are global."""

    def to_checkpoint(self, state):
        return state

    def from_checkpoint(self, state):
        return state

    def params(self, state):
        return state.params

    def host_metrics(self, metrics):
        return jax.device_get(metrics)

    def step(self, state):
        return state.step


class SinglePlacement(_JitPlacement):
    """Everything on the first local device; `jit` with donated state."""

    mode = "single"

    def __init__(self, config):
        del config
        self.device = jax.local_devices()[0]
        self.sharding = jax.sharding.SingleDeviceSharding(self.device)
        self.num_replicas = 1

    def place_state(self, create_fn, *args):
        return jax.jit(create_fn, out_shardings=self.sharding)(*args)

    def place_batch(self, batch):
        return jax.device_put(batch, self.sharding)

    def compile_train(self, step):
        return jax.jit(step, donate_argnums=0)

    def compile_eval(self, step):
        return jax.jit(step)

    def restore_target(self, abstract):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=self.sharding), abstract)


class PmapPlacement:
    """Classic data parallelism: state replicated on every local device, `pmap` + `psum`."""

    mode = "pmap"
    axis = "batch"

    def __init__(self, config):
        del config
        self.devices = jax.local_devices()
        self.num_replicas = jax.device_count()
        # Checkpoints hold plain replicated global arrays over every device of every process.
        self.global_sharding = NamedSharding(
            jax.sharding.Mesh(np.array(jax.devices()), ("all",)), P())

    def _replicate(self, x):
        shape = (len(self.devices), *x.shape)  # (local devices, ...)
        sharding = NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("replica",)),
                                 P("replica"))
        by_device = {s.device: s.data for s in x.addressable_shards}
        parts = [jax.device_put(by_device.get(d, x.addressable_shards[0].data), d)[None]
                 for d in self.devices]
        return jax.make_array_from_single_device_arrays(shape, sharding, parts)

    def place_state(self, create_fn, *args):
        state = jax.jit(create_fn)(*args)
        return jax.tree.map(self._replicate, state)

    def place_batch(self, batch):
        n = len(self.devices)
        return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

    def compile_train(self, step):
        return jax.pmap(functools.partial(step, axis_name=self.axis), axis_name=self.axis,
                        donate_argnums=0)

    def compile_eval(self, step):
        return jax.pmap(functools.partial(step, axis_name=self.axis), axis_name=self.axis,
                        in_axes=(0, 0, None))

    def to_checkpoint(self, state):
        def unreplicate(x):
            parts = [s.data[0] for s in x.addressable_shards]  # one (…) copy per local device
            return jax.make_array_from_single_device_arrays(x.shape[1:], self.global_sharding,
                                                            parts)
        return jax.tree.map(unreplicate, state)

    def restore_target(self, abstract):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                           sharding=self.global_sharding),
                            abstract)

    def from_checkpoint(self, state):
        return jax.tree.map(self._replicate, state)

    def params(self, state):
        return jax.tree.map(lambda x: x.addressable_shards[0].data[0], state.params)

    def host_metrics(self, metrics):
        return jax.device_get(jax.tree.map(lambda x: x[0], metrics))

    def step(self, state):
        return state.step[0]


class MeshPlacement(_JitPlacement):
    """`jit` over a (data, fsdp, model) mesh with `NamedSharding`s; works across processes."""

    mode = "mesh"

    def __init__(self, config):
        sizes = mesh_shape(config.train.mesh, jax.device_count())
        self.mesh = jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        self.num_replicas = sizes[0] * sizes[1]
        self.rules = tuple((r, tuple(s)) for r, s in config.train.get("partition_rules",
                                                                        DEFAULT_RULES))
        self.min_size = int(config.train.get("fsdp_min_size", 2**14))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.state_sharding = None  # set by place_state / restore_target

    def state_shardings(self, abstract):
        """NamedSharding for every leaf of an abstract state (same rule for params and moments)."""
        fsdp = self.mesh.shape["fsdp"]
        return jax.tree_util.tree_map_with_path(
            lambda p, a: NamedSharding(self.mesh, partition_spec(
                path_str(p), a.shape, fsdp, self.rules, self.min_size)), abstract)

    def place_state(self, create_fn, *args):
        self.state_sharding = self.state_shardings(jax.eval_shape(create_fn, *args))
        return jax.jit(create_fn, out_shardings=self.state_sharding)(*args)

    def place_batch(self, batch):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

    def compile_train(self, step):
        # The state keeps the layout it was placed with (by place_state or restore_target).
        return jax.jit(step, donate_argnums=0, out_shardings=(self.state_sharding, self.replicated))

    def compile_eval(self, step):
        return jax.jit(step, out_shardings=self.replicated)

    def restore_target(self, abstract):
        self.state_sharding = self.state_shardings(abstract)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, self.state_sharding)


PLACEMENTS = {"single": SinglePlacement, "pmap": PmapPlacement, "mesh": MeshPlacement}


def make_placement(config):
    """The placement for `config.train.parallel` ("single" | "pmap" | "mesh")."""
    mode = config.train.parallel
    if mode not in PLACEMENTS:
        raise ValueError(f"config.train.parallel must be one of {sorted(PLACEMENTS)}, "
                         f"got {mode!r}")
    return PLACEMENTS[mode](config)
