"""Train/eval steps, losses and the optimizer recipe, on the small stand-in models (one device)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy
from conftest import assert_close, rel_err

from ttt.train import optim, steps


@functools.cache
def _cached_setup(kind):
    config = toy.toy_config(kind)
    ds = toy.make_dataset(config.data, "train", 8, seed=0)
    from ttt.train.setup import resolve_config

    config = resolve_config(config, ds.meta)
    task = steps.make_task(config, toy.build_model(config.model))
    batch = next(ds.iterator())
    params = jax.jit(task.init)(jax.random.PRNGKey(0), batch)
    return config, task, params, batch


def _setup(kind="lm"):
    """(config copy, task, params, batch) for the toy `kind`; compiled once per session."""
    config, task, params, batch = _cached_setup(kind)
    return config.copy_and_resolve_references(), task, params, batch


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_lm_loss_and_eval_step_are_masked_token_sums():
    _, task, params, batch = _setup("lm")
    sums = jax.jit(lambda p, b: steps.eval_step(p, b, 1.0, task=task))(params, batch)
    logits, aux = jax.jit(task.model.apply)({"params": params}, batch["inputs"])
    logp = _np_log_softmax(np.asarray(logits, np.float64))  # (B, N, V)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    assert batch["mask"].min() == 0 and batch["mask"].max() == 1  # the mask really masks
    assert rel_err(sums["loss_sum"], (nll * batch["mask"]).sum()) < 1e-5
    assert float(sums["weight"]) == batch["mask"].sum()
    hits = (np.asarray(logits).argmax(-1) == batch["targets"]) * batch["mask"]
    assert float(sums["correct"]) == hits.sum()
    assert aux["inner_loss"].shape == (2, 2)
    # negative control: an unmasked sum differs
    assert rel_err(sums["loss_sum"], nll.sum()) > 1e-2


@pytest.mark.slow  # four compilations of the stand-in ViT
def test_classification_label_smoothing_and_mixup():
    config, task, params, batch = _setup("vit")
    task = task._replace(label_smoothing=0.1)
    loss_fn = jax.jit(lambda t, p, b, seed, train: t.loss(p, b, jax.random.PRNGKey(seed), 1.0,
                                                         train), static_argnums=(0, 4))
    loss_sum, (weight, _, _) = loss_fn(task, params, batch, 0, True)
    logits, _ = jax.jit(lambda p, x, r: task.model.apply({"params": p}, x, train=True,
                                                         rngs={"inner": r}))(
        params, batch["images"], jax.random.split(jax.random.PRNGKey(0))[1])
    k = config.model.num_classes
    target = np.eye(k)[batch["labels"]] * 0.9 + 0.1 / k  # (B, K)
    expected = -(target * _np_log_softmax(np.asarray(logits, np.float64))).sum()
    assert rel_err(loss_sum, expected) < 1e-5 and float(weight) == 8
    # mixup changes the training loss but never the eval loss
    mixed = task._replace(mixup_alpha=0.4)
    a = loss_fn(mixed, params, batch, 0, True)[0]
    assert rel_err(a, loss_sum) > 1e-4  # mixup changed the training loss
    # eval ignores both smoothing and mixup: its sum is the plain cross-entropy
    plain = -np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64)),
                                batch["labels"][:, None], -1).sum()
    assert rel_err(loss_fn(mixed, params, batch, 0, False)[0], plain) < 1e-3


def test_lr_schedule_warmup_cosine_and_ttt_mult():
    config = toy.toy_config()
    config.optim.update(lr=1e-3, end_lr=1e-5, warmup_steps=10)
    lr = optim.lr_schedule(config.optim, total_steps=110)
    assert float(lr(0)) == 0.0
    assert abs(float(lr(5)) - 5e-4) < 1e-9
    assert abs(float(lr(10)) - 1e-3) < 1e-9
    mid = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * 0.5))
    assert abs(float(lr(60)) - mid) < 1e-8
    assert abs(float(lr(110)) - 1e-5) < 1e-10
    assert float(optim.ttt_lr_mult_schedule(config.optim)(0)) == 1.0  # off by default
    config.optim.ttt_mlp_lr_warmup = True
    mult = optim.ttt_lr_mult_schedule(config.optim)
    # base lr 0.1 of TTT-MLP: 0.01 at step 0, 0.1 after warm-up
    assert abs(float(mult(0)) * 0.1 - 0.01) < 1e-8 and float(mult(10)) == 1.0
    assert abs(float(mult(5)) - 0.55) < 1e-6


def test_weight_decay_mask_matrices_only():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones((3,))}
    config = toy.toy_config()
    config.optim.update(lr=1.0, warmup_steps=0, weight_decay=0.5, clip=0.0,
                        weight_decay_mask="matrices")
    tx = optim.make_optimizer(config.optim, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["b"][0]) == 0.0  # not decayed
    assert abs(float(updates["w"][0, 0]) + 0.5) < 1e-6  # -lr * wd * w


@pytest.mark.parametrize("which", ["all", "matrices"])
def test_weight_decay_skips_decay_rates_time_steps_and_skips(which):
    """A_log, dt_bias (Gated DeltaNet, Mamba2, gated TTT) and D (Mamba2) are never decayed;
    the names are the real layers' (a Mamba2 and a Gated DeltaNet mixer's parameters)."""
    from ttt.layers import make_mixer

    x = jnp.ones((1, 8, 64))
    params = {name: make_mixer(name, 64, 4).init(jax.random.PRNGKey(0), x)["params"]
              for name in ("mamba2", "gated_deltanet")}
    mask = optim.weight_decay_mask(params, which)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    skipped = {k for k, v in flat.items() if not v}
    for key in ("['mamba2']['A_log']", "['mamba2']['dt_bias']", "['mamba2']['D']",
                "['gated_deltanet']['A_log']", "['gated_deltanet']['dt_bias']"):
        assert key in skipped, (key, sorted(flat))
    assert flat["['gated_deltanet']['wq']['kernel']"]  # a matrix: decayed either way
    assert (which == "matrices") == ("['gated_deltanet']['o_norm']" in skipped)


def _one_step(task, params, batch, config, accum):
    tx = optim.make_optimizer(config.optim, config.train.steps)
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params),
                             jax.random.PRNGKey(1))
    fn = jax.jit(lambda s, b: steps.train_step(
        s, b, task=task, tx=tx, lr_fn=optim.lr_schedule(config.optim, config.train.steps),
        ttt_lr_fn=optim.ttt_lr_mult_schedule(config.optim), grad_accum=accum))
    return fn(state, batch), tx, fn


def test_train_step_gradient_is_global_masked_mean_and_accumulation_agrees():
    config, task, params, batch = _setup("lm")
    config.optim.update(warmup_steps=0, lr=3e-2)
    config.train.steps = 100
    (state1, m1), tx, step_fn = _one_step(task, params, batch, config, accum=1)
    (state4, m4), _, _ = _one_step(task, params, batch, config, accum=4)
    # independent reference: grad of the global masked mean, then the optax update
    def mean_loss(p):
        logits, _ = task.model.apply({"params": p}, batch["inputs"])
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = optax.apply_updates(params, updates)
    assert rel_err(m1["loss"], loss) < 1e-6
    assert rel_err(m1["grad_norm"], optax.tree.norm(grads)) < 1e-5
    assert_close(state1.params, expected, 1e-5, "1 micro-batch")
    assert_close(state4.params, expected, 1e-5, "4 micro-batches")
    assert rel_err(m4["loss"], loss) < 1e-5 and int(state4.step) == 1
    # negative control: mean of per-micro-batch means is a different (wrong) loss
    micro = steps._microbatches(batch, 4)
    per = jax.jit(jax.vmap(lambda b: task.loss(params, b, None, 1.0, False)))(micro)
    assert abs(float(jnp.mean(per[0] / per[1][0])) - float(loss)) > 1e-4
    # and the same compiled step keeps training: the loss falls, diagnostics come out
    state, losses = state1, []
    for _ in range(25):
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.7 * float(loss), losses
    assert metrics["aux"]["inner_loss"].shape == (2, 2) and float(metrics["lr"]) > 0


def test_make_task_rejects_unknown_kind():
    config = toy.toy_config()
    config.model.kind = "rnn"
    with pytest.raises(ValueError, match="model.kind"):
        steps.make_task(config, None)


def _np_ce(logits, labels):
    return -np.take_along_axis(_np_log_softmax(np.asarray(logits, np.float64)),
                               np.asarray(labels)[:, None], -1)[:, 0]


def test_classification_padded_rows_count_zero():
    """A short final eval batch is padded with mask-0 rows (zero images labelled 0): they must
    weigh nothing in the loss, the accuracy or the count."""
    _, task, params, batch = _setup("vit")
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
    padded = {"images": batch["images"] * mask[:, None, None, None],
              "labels": (batch["labels"] * mask).astype(np.int32), "mask": mask}
    sums = jax.jit(lambda p, b: steps.eval_step(p, b, 1.0, task=task))(params, padded)
    logits, _ = jax.jit(lambda p, x: task.model.apply({"params": p}, x, train=False))(
        params, padded["images"])
    real = mask > 0
    assert float(sums["weight"]) == 5
    assert rel_err(sums["loss_sum"], _np_ce(logits, padded["labels"])[real].sum()) < 1e-6
    hits = np.asarray(logits).argmax(-1) == padded["labels"]
    assert float(sums["correct"]) == hits[real].sum()
    # negative control: counting every row gives another loss
    assert rel_err(sums["loss_sum"], _np_ce(logits, padded["labels"]).sum()) > 1e-3


def test_digits_evaluation_counts_300_images():
    """The digits validation split (300 images) in batches of 64: 5 batches, 320 rows, of which
    exactly the 300 real images are scored; accuracy and loss equal a direct computation."""
    from ttt.data import make_dataset
    from ttt.train.setup import build_setup, resolve_config
    from ttt.train.train import evaluate

    config = toy.toy_config("vit")
    config.data = {"name": "digits"}
    config.train.global_batch_size = 64
    ds = make_dataset(config.data, "validation", 64, seed=0)
    config = resolve_config(config, ds.meta)
    setup = build_setup(config, ds.meta, toy.build_model)
    state = setup.placement.place_state(setup.create_state)
    result = evaluate(setup, setup.placement.compile_eval(setup.eval_step), state, ds, 100)
    assert result["count"] == 300
    from ttt.data.images import digits

    images, labels = digits("validation")
    logits, _ = jax.jit(lambda p, x: setup.task.model.apply({"params": p}, x, train=False))(
        state.params, images)
    assert result["accuracy"] == float(np.mean(np.asarray(logits).argmax(-1) == labels))
    assert rel_err(result["loss"], _np_ce(logits, labels).mean()) < 1e-5


def test_mixup_trains_on_the_mixed_labels():
    """With train.mixup_alpha the loss is λ·CE(y) + (1−λ)·CE(y rolled) on the mixed images (the
    step's mixup is the only one; the pipeline refuses data.mixup)."""
    _, task, params, batch = _setup("vit")
    mixed_task = task._replace(mixup_alpha=0.4)
    rng = jax.random.PRNGKey(3)
    loss_sum, (weight, _, _) = jax.jit(
        lambda p, b, r: mixed_task.loss(p, b, r, 1.0, True))(params, batch, rng)
    mix_rng, inner_rng = jax.random.split(rng)
    lam = float(jax.random.beta(mix_rng, 0.4, 0.4))
    images = lam * batch["images"] + (1 - lam) * np.roll(batch["images"], 1, axis=0)
    logits, _ = jax.jit(lambda p, x, r: task.model.apply({"params": p}, x, train=True,
                                                         rngs={"inner": r}))(
        params, images, inner_rng)
    labels = batch["labels"]
    expected = (lam * _np_ce(logits, labels) + (1 - lam) * _np_ce(logits, np.roll(labels, 1)))
    assert 0.0 < lam < 1.0 and float(weight) == len(labels)
    assert rel_err(loss_sum, expected.sum()) < 1e-5
    # negative control: the hard labels alone give another loss
    assert rel_err(loss_sum, _np_ce(logits, labels).sum()) > 1e-3


def test_diagnostics_run_only_on_the_steps_that_log_them(tmp_path):
    """The real TTT-Linear LM, diag_every=2: steps 2 and 4 report the inner-loss statistics
    (their own compiled step), steps 1 and 3 run the plain layer; the parameter tree is the same
    and the plain step has fewer FLOPs (the extra inner pass is not in it)."""
    import json
    import os

    from ttt.models import build_model, without_diagnostics
    from ttt.train.setup import build_setup, resolve_config
    from ttt.train.train import train_and_evaluate

    config = toy.real_config("ttt_linear", steps=4, log_every=1, diag_every=2,
                             checkpoint_every=100, async_checkpoints=False)
    summary = train_and_evaluate(config, str(tmp_path), build_model=build_model,
                                 make_dataset=toy.make_dataset)
    logged = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    with_stats = [x["step"] for x in logged if any("inner_loss_after" in k for k in x)]
    assert [x["step"] for x in logged] == [1, 2, 3, 4] and with_stats == [2, 4], logged
    assert summary["step"] == 4

    meta = toy.make_dataset(config.data, "train", 8, seed=0).meta
    setup = build_setup(resolve_config(config, meta), meta, build_model)
    assert setup.diag_step is not None
    assert dict(setup.task.model.mixer_kwargs)["stats"] is False
    plain = without_diagnostics(setup.task.model)
    assert plain is setup.task.model  # already off: nothing to change
    init = lambda m: jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
    full = build_model(setup.config.model)
    assert jax.tree.structure(init(full)) == jax.tree.structure(init(plain))
    state = jax.eval_shape(setup.create_state)
    batch = jax.tree.map(jnp.asarray, next(toy.make_dataset(config.data, "train", 8,
                                                              seed=0).iterator()))
    flops = {name: jax.jit(fn).lower(state, batch).cost_analysis()["flops"] for name, fn in
             (("plain", setup.train_step), ("diag", setup.diag_step))}
    assert flops["plain"] < flops["diag"], flops
    outs = {name: jax.eval_shape(fn, state, batch)[1]["aux"] for name, fn in
            (("plain", setup.train_step), ("diag", setup.diag_step))}
    assert outs["plain"] == {} and "inner_loss_after" in outs["diag"]
