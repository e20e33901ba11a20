"""Where the state and the batches live: one device, `pmap` replicas, or a `jit` mesh.

`make_placement(config)` picks one of three classes with the same methods, so the training driver
never branches on the mode:

- `place_state(create_fn)`: run the state constructor so its outputs land where they belong
  (on the mesh, parameters are born sharded: no host copy of a model that does not fit).
- `place_batch(local_batch)`: this process's rows -> the step's batch argument.
- `compile_train(step)`, `compile_eval(step)`: the wrapped step functions.
- `to_checkpoint(state)` / `restore_target(abstract)` / `from_checkpoint(state)`: global arrays for
  orbax, so a checkpoint written under one mode or device count restores under any other.

Mesh axes are (data, fsdp, model). The batch is split over data x fsdp. Every state leaf (a
parameter and its optimizer moments alike) takes the first matching rule of
`train.partition_rules` (the user's, a spec for the full shape, taken as written), then of
`DEFAULT_RULES`, else fsdp along its largest divisible axis when it has at least
`train.fsdp_min_size` elements (vectors and small matrices are replicated).

`DEFAULT_RULES` is head (tensor) parallelism on `model` plus FSDP (docs/design.md §12):
- Q/K/V (and the Mamba backbone's XQK, convolutions and gate) are column-parallel: their output
  features, head-major, are split over `model`, so each device holds whole heads; the output
  projection is row-parallel (its input features split), so a block ends in one reduction.
- The per-head parameters of the TTT layer (initial inner weights, inner LayerNorm, the η gate)
  and of MTTT are split over `model` along their head axis, never along an inner feature axis:
  the inner loop runs per head and needs no collective. (The token offsets are one vector per
  mini-batch position shared by the heads: replicated.)
- The SwiGLU / MLP hidden dimension is split over `model` (w1, w3 columns, w2 rows), and so is the
  vocabulary of the tied embedding (the logits come out split over the vocabulary).
- The other matrix axis of each of these goes to `fsdp`.
A default rule's spec names the trailing axes, so a scanned stack's leading layer axis stays
whole, and a mesh axis is dropped where it has size 1 or does not divide the array's axis (a
`model` size that does not divide the heads is refused earlier by config validation). Activation
constraints at block boundaries (`ttt.layers.common.shard`) keep this layout inside the step;
they apply while the placement's mesh is set (`jax.set_mesh`), i.e. inside its compiled steps.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ttt.config import MESH_AXES, mesh_shape

_F, _M = "fsdp", "model"
_MIXER = r"(^|/)seq_modeling_block/"
# (path regex, spec of the trailing axes). Paths read like 'params/h/seq_modeling_block/wq/kernel'
# (scanned stacks add a leading layer axis, unrolled ones an index: 'params/h/3/...'), optimizer
# moments like 'opt_state/1/0/mu/h/...'.
DEFAULT_RULES = (
    # attention and TTT projections (C, C): columns = heads (head-major), rows for wo
    (_MIXER + r"(wq|wk|wv|wg)/kernel$", (_F, _M)),
    (_MIXER + r"(wq|wk|wv)/bias$", (_M,)),
    (_MIXER + r"wo/kernel$", (_M, _F)),
    # Mamba backbone: the depthwise convolutions of XQK (width, 1, C), biases (C,)
    (_MIXER + r"conv_[qk]/kernel$", (None, None, _M)),
    (_MIXER + r"conv_[qk]/bias$", (_M,)),
    # TTT per-head parameters: W0 kernels (H, d_in, d_out) and biases (H, d_out), the inner LN
    # (H, d), the η gate
    (_MIXER + r"ttt_dense_\d+$", (_M, None, None)),
    (_MIXER + r"ttt_bias_\d+$", (_M, None)),
    (_MIXER + r"ttt_norm/(scale|bias)$", (_M, None)),
    (_MIXER + r"learnable_ttt_lr/kernel$", (_M, _F, None)),
    (_MIXER + r"learnable_ttt_lr/bias$", (_M, None)),
    (_MIXER + r"learnable_token_idx$", ()),
    # MTTT per-head parameters: φ, ψ (H, C, d), biases (H, d), g, h (H, d, C), W0, decoder LN
    (_MIXER + r"(psi|phi)/kernel$", (_M, _F, None)),
    (_MIXER + r"(psi|phi)/bias$", (_M, None)),
    (_MIXER + r"(g|h)/kernel$", (_M, None, _F)),
    (r"(^|/)inner_Dense_\d+/kernel$", (_M, None, None)),
    (r"(^|/)inner_Dense_\d+/bias$", (_M, None)),
    (_MIXER + r"decoder_LN/(scale|bias)$", (_M, None)),
    # LaCT: fast weights (Hf, ·, ·) over their heads; the fused [q|k|v] projection (C, 3C) and
    # the per-head rate projections (C, ·Hf) only over fsdp (their columns are not head-major)
    (_MIXER + r"fw/W\d+$", (_M, None, None)),
    (_MIXER + r"(wqkv|lr_proj|momentum_proj|ttt_scale_proj)/kernel$", (_F, None)),
    # feed-forward: hidden dimension over model
    (r"(^|/)feed_forward/(w1|w3)/kernel$", (_F, _M)),
    (r"(^|/)feed_forward/w2/kernel$", (_M, _F)),
    (r"(^|/)MlpBlock_0/Dense_0/kernel$", (_F, _M)),
    (r"(^|/)MlpBlock_0/Dense_0/bias$", (_M,)),
    (r"(^|/)MlpBlock_0/Dense_1/kernel$", (_M, _F)),
    # tied embedding (V, C): vocabulary over model
    (r"(^|/)wte/embedding$", (_M, _F)),
)
# What the rules above do not catch of the inner state (another rank) stays replicated.
_INNER_STATE = (r"(^|/)(ttt_dense_\d+|ttt_bias_\d+|ttt_norm|W0|inner_[^/]*)(/|$)", ())


def path_str(path) -> str:
    """'opt_state/0/mu/Dense_0/kernel' from a jax key path."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _fit(shape, trailing, sizes: Mapping[str, int], min_size: int) -> P | None:
    """A default rule's trailing spec on `shape`: None if the ranks do not fit; mesh axes of size 1
    or not dividing their array axis are dropped, and fsdp is dropped below `min_size`."""
    if len(trailing) > len(shape):
        return None
    spec = [None] * (len(shape) - len(trailing)) + list(trailing)
    small = math.prod(shape) < min_size
    out = []
    for dim, axis in zip(shape, spec, strict=True):
        n = sizes.get(axis, 1) if axis else 1
        keep = axis is not None and n > 1 and dim % n == 0 and not (axis == _F and small)
        out.append(axis if keep else None)
    return P(*out) if any(out) else P()


def partition_spec(path: str, shape, mesh: int | Mapping[str, int] = 1, rules=(),
                   min_size: int = 0) -> P:
    """PartitionSpec for one state leaf on a mesh of `mesh` axis sizes ({"fsdp": 8, "model": 2};
    an int is the fsdp size alone): the first matching user rule as written, else the first
    fitting `DEFAULT_RULES` entry, else fsdp on the largest divisible axis."""
    sizes = {_F: mesh} if isinstance(mesh, int) else dict(mesh)
    for pattern, spec in rules:
        if re.search(pattern, path):
            return P(*spec)
    for pattern, trailing in (*DEFAULT_RULES, _INNER_STATE):
        if re.search(pattern, path):
            spec = _fit(shape, trailing, sizes, min_size)
            if spec is not None:
                return spec
    fsdp = sizes.get(_F, 1)
    if fsdp == 1 or len(shape) < 2 or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = _F
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


class _InMesh:
    """A jitted function traced with `mesh` set (`jax.set_mesh`), so the models' activation
    constraints (`ttt.layers.common.shard`) see the mesh axes; calls and `.lower` alike."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args)


class MeshPlacement(_JitPlacement):
    """`jit` over a (data, fsdp, model) mesh with `NamedSharding`s; works across processes."""

    mode = "mesh"

    def __init__(self, config):
        sizes = mesh_shape(config.train.mesh, jax.device_count())
        self.mesh = jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
        self.num_replicas = sizes[0] * sizes[1]
        # the user's rules come first; DEFAULT_RULES always apply after them
        self.rules = tuple((r, tuple(s)) for r, s in config.train.get("partition_rules", ()))
        self.min_size = int(config.train.get("fsdp_min_size", 2**14))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(("data", "fsdp")))
        self.state_sharding = None  # set by place_state / restore_target

    def state_shardings(self, abstract):
        """NamedSharding for every leaf of an abstract state (same rule for params and moments)."""
        sizes = dict(self.mesh.shape)
        return jax.tree_util.tree_map_with_path(
            lambda p, a: NamedSharding(self.mesh, partition_spec(
                path_str(p), a.shape, sizes, self.rules, self.min_size)), abstract)

    def place_state(self, create_fn, *args):
        self.state_sharding = self.state_shardings(jax.eval_shape(create_fn, *args))
        return _InMesh(jax.jit(create_fn, out_shardings=self.state_sharding), self.mesh)(*args)

    def place_batch(self, batch):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)

    def compile_train(self, step):
        # The state keeps the layout it was placed with (by place_state or restore_target).
        return _InMesh(jax.jit(step, donate_argnums=0,
                               out_shardings=(self.state_sharding, self.replicated)), self.mesh)

    def compile_eval(self, step):
        return _InMesh(jax.jit(step, out_shardings=self.replicated), self.mesh)

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
