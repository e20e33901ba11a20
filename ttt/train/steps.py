"""Pure train and eval steps: the meta-gradient of the task loss through the whole model.

Notable choices
- Losses are returned as *sums* with their weight (number of unmasked tokens / examples; padded
  rows of a final eval batch have mask 0 and weigh nothing, for images as for text). The step
  divides only after summing over micro-batches and devices, so the gradient is exactly the mean
  over the global batch whatever the split (one device, pmap, mesh, gradient accumulation) — a
  masked mean per device followed by `pmean` would overweight devices with few unmasked tokens.
- The same `train_step` runs everywhere: `axis_name` is set only under `pmap`, where the sums are
  `psum`-ed; under `jit` on a mesh the arrays are global and XLA inserts the collectives.
- Gradient accumulation takes strided micro-batches (rows i, i+A, i+2A, ...) so a batch axis that is
  sharded over devices stays sharded after the reshape.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `rng` is a raw uint32 (2,) key so it checkpoints as an array."""

    step: jax.Array  # () int32
    params: Any
    opt_state: Any
    rng: jax.Array  # (2,) uint32


class Task(NamedTuple):
    """How one kind of model is initialised and scored. Built by `make_task`."""

    kind: str  # "lm" | "vit"
    model: nn.Module
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0

    def init(self, rng: jax.Array, batch: dict) -> Any:
        """Parameters from a one-row slice of `batch` (shapes only matter)."""
        params_rng, inner_rng = jax.random.split(rng)
        if self.kind == "lm":
            variables = self.model.init({"params": params_rng}, batch["inputs"][:1])
        else:
            variables = self.model.init({"params": params_rng, "inner": inner_rng},
                                        batch["images"][:1], train=False)
        return variables["params"]

    def loss(self, params, batch: dict, rng: jax.Array, ttt_lr_mult, train: bool):
        """-> (loss_sum (), (weight (), correct (), aux)) for one (micro-)batch."""
        if self.kind == "lm":
            logits, aux = self.model.apply({"params": params}, batch["inputs"],
                                           ttt_lr_mult=ttt_lr_mult)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # (B, N, V)
            nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
            mask = batch["mask"].astype(jnp.float32)  # (B, N)
            hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
            return jnp.sum(nll * mask), (jnp.sum(mask), jnp.sum(hit * mask), aux)
        return self._classification_loss(params, batch, rng, train)

    def _classification_loss(self, params, batch, rng, train):
        images, labels = batch["images"], batch["labels"]
        # Rows padded onto a short final eval batch have mask 0 and count for nothing.
        mask = batch["mask"].astype(jnp.float32) if "mask" in batch else \
            jnp.ones(labels.shape, jnp.float32)  # (B,)
        num_classes = self.model.num_classes
        targets = jax.nn.one_hot(labels, num_classes)  # (B, K)
        mix_rng, inner_rng = jax.random.split(rng)
        if train and self.mixup_alpha > 0:
            # The only mixup (the data pipeline does none): one coefficient per batch, partner =
            # the previous row (as in big_vision's mixup); the loss uses the mixed targets.
            lam = jax.random.beta(mix_rng, self.mixup_alpha, self.mixup_alpha)
            images = lam * images + (1 - lam) * jnp.roll(images, 1, axis=0)
            targets = lam * targets + (1 - lam) * jnp.roll(targets, 1, axis=0)
        if train and self.label_smoothing > 0:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        logits, aux = self.model.apply({"params": params}, images, train=train,
                                       rngs={"inner": inner_rng})
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # (B, K)
        nll = -jnp.sum(targets * logp, axis=-1)  # (B,)
        hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)  # (B,)
        return jnp.sum(nll * mask), (jnp.sum(mask), jnp.sum(hit * mask), aux)


def make_task(config, model: nn.Module) -> Task:
    """The Task for `config.model.kind` ("lm" or "vit")."""
    kind = config.model.kind
    if kind not in ("lm", "vit"):
        raise ValueError(f"config.model.kind must be 'lm' or 'vit', got {kind!r}")
    return Task(kind, model, float(config.train.get("label_smoothing", 0.0)),
                float(config.train.get("mixup_alpha", 0.0)))


def _microbatches(batch: dict, accum: int) -> dict:
    """(B, ...) -> (accum, B / accum, ...) with micro-batch i = rows i, i + accum, ..."""
    def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])  # (B/A, A, ...)
        return jnp.swapaxes(x, 0, 1)  # (A, B/A, ...)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict, *, task: Task, tx: optax.GradientTransformation,
               lr_fn, ttt_lr_fn, grad_accum: int = 1, axis_name: str | None = None):
    """One outer step: value_and_grad of the mean task loss, then the optimizer update.

    batch: this replica's rows (pmap) or the global batch (single device / mesh).
    Returns (new state, metrics) where metrics holds scalars and the model's aux (averaged).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    ttt_lr_mult = ttt_lr_fn(state.step)
    grad_fn = jax.value_and_grad(
        lambda p, mb, r: task.loss(p, mb, r, ttt_lr_mult, train=True), has_aux=True)

    if grad_accum == 1:
        (loss_sum, (weight, correct, aux)), grads = grad_fn(state.params, batch, rng)
    else:
        def body(carry, xs):
            mb, i = xs
            out, g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (out, g)), None

        micro = _microbatches(batch, grad_accum)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(grad_fn, state.params, first, rng))
        ((loss_sum, (weight, correct, aux)), grads), _ = jax.lax.scan(
            body, zeros, (micro, jnp.arange(grad_accum)))
        aux = jax.tree.map(lambda a: a / grad_accum, aux)

    if axis_name is not None:
        loss_sum, weight, correct, grads = jax.lax.psum((loss_sum, weight, correct, grads),
                                                        axis_name)
        aux = jax.lax.pmean(aux, axis_name)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / weight,
        "accuracy": correct / weight,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": jnp.asarray(lr_fn(state.step), jnp.float32),
        "ttt_lr_mult": jnp.asarray(ttt_lr_mult, jnp.float32),
        "aux": aux,
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(params, batch: dict, ttt_lr_mult, *, task: Task,
              axis_name: str | None = None) -> dict:
    """Sums over one eval batch: {"loss_sum", "weight", "correct"} (psum-ed under pmap).

    ttt_lr_mult: the inner learning-rate multiplier the model is currently trained with.
    """
    loss_sum, (weight, correct, _) = task.loss(params, batch, jax.random.PRNGKey(0), ttt_lr_mult,
                                               train=False)
    sums = {"loss_sum": loss_sum, "weight": weight, "correct": correct}
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums
