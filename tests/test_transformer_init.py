"""A TTT LM initialised from a softmax-attention LM (ttt.train.transformer_init): what is copied,
what keeps its initial value, and that the result trains."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttt.interop import trees
from ttt.models import build_model, unstack_layers
from ttt.train.transformer_init import init_ttt_from_transformer

# ---------------------------------------------------------------------------- transformer -> TTT

def _lm_config(mixer, **kwargs):
    # the tiny preset narrowed further, so the training test compiles quickly
    return {**dict(kind="lm", preset="tiny", mixer=mixer, vocab_size=64, width=32, num_heads=2,
                   ffn_dim=64), **kwargs}


def _check_initial(path, leaf):
    """A TTT-only parameter still holds its initial value (zeros, ones or N(0, 0.02²))."""
    name = path.split("/")[-1]
    if name == "scale":
        assert np.all(leaf == 1.0), path
    elif name in ("bias", "learnable_token_idx") or name.startswith("ttt_bias_"):
        assert np.all(leaf == 0.0), path
    else:
        assert leaf.std() < 0.05 or path.endswith(("conv_q/kernel", "conv_k/kernel")), path


def _random_transformer(seed, **kwargs):
    """A softmax-attention LM's variables with random values (as if trained), in its layout."""
    sm = build_model(_lm_config("softmax", **kwargs))
    shapes = jax.eval_shape(sm.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.5, 0.1, s.shape).astype(np.float32), shapes)


@functools.cache
def _converted():
    sm_vars = _random_transformer(7)
    cfg = _lm_config("ttt_linear", mixer_kwargs={"mini_batch": 8, "stats": False})
    return sm_vars, *init_ttt_from_transformer(cfg, sm_vars, seed=1)


def test_init_ttt_from_transformer_copies():
    sm_vars, model, variables = _converted()
    flat_ours = trees.flatten(unstack_layers(variables["params"]))
    flat_theirs = trees.flatten(unstack_layers(sm_vars["params"]))
    expected_shared = {"wte/embedding", "ln_f/kernel"} | {
        f"h/{i}/{name}" for i in range(2) for name in (
            "seq_norm/kernel", "ffn_norm/kernel", "feed_forward/w1/kernel",
            "feed_forward/w2/kernel", "feed_forward/w3/kernel",
            *(f"seq_modeling_block/{w}/kernel" for w in ("wq", "wk", "wv", "wo")))}
    assert set(flat_theirs) == expected_shared  # the softmax LM has nothing else
    for k in expected_shared:
        assert flat_ours[k].dtype == flat_theirs[k].dtype, k
        assert np.array_equal(flat_ours[k], flat_theirs[k]), k
    ttt_only = set(flat_ours) - expected_shared
    assert {p.split("/", 3)[-1] for p in ttt_only} >= {
        "ttt_dense_0", "ttt_bias_0", "learnable_token_idx", "ttt_norm/scale", "post_norm/bias"}
    for k in ttt_only:
        _check_initial(k, np.asarray(flat_ours[k]))
    with pytest.raises(ValueError, match="not the same size"):
        init_ttt_from_transformer(_lm_config("ttt_linear", ffn_dim=32), sm_vars)


@pytest.mark.slow
def test_init_ttt_from_transformer_trains():
    _, model, variables = _converted()
    ids = np.random.default_rng(3).integers(0, 64, (2, 17)).astype(np.int32)

    def loss_fn(params):
        logits, _ = model.apply({"params": params}, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    opt = optax.adam(3e-3)
    params = variables["params"]
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(6):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.slow
def test_init_ttt_from_transformer_mamba():
    sm_vars = _random_transformer(0, scan_layers=False)
    cfg = _lm_config("ttt_mlp", mixer_kwargs={"backbone": "mamba", "stats": False})
    model, variables = init_ttt_from_transformer(cfg, sm_vars)
    assert model.pre_conv and isinstance(model, nn.Module)
    ours = trees.flatten(unstack_layers(variables["params"]))
    theirs = trees.flatten(sm_vars["params"])
    for k in ("h/1/seq_modeling_block/wq/kernel", "h/1/feed_forward/w2/kernel", "wte/embedding"):
        assert np.array_equal(ours[k], theirs[k]), k
    assert "h/1/seq_modeling_block/wk/kernel" not in ours  # Mamba backbone: no wk to fill
    for k in ("h/1/conv/conv1/bias", "h/1/seq_modeling_block/conv_q/bias"):
        _check_initial(k, np.asarray(ours[k]))  # TTT-only here


