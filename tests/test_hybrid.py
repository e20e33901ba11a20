"""Hybrid stacks (`model.pattern`): a tiny hybrid trains, decodes == forward, shards on 8 simulated
devices.

A per-layer pattern of mixers repeated to the depth (ttt/models/hybrid.py): parsing and its
one-line errors, the per-mixer kwargs, the parameter layout (scanned: h/pattern_<j> with a leading
repeats axis; unrolled: h/<i>), the forward equal to the same blocks applied by hand (negative
control: the layers in another order), prefill + steps == forward, scanned == unrolled (outputs
and gradients), the real trainer on one device and on the 2 x 2 x 2 mesh, the ViT with a pattern,
the Transformer initialisation and the ttt-lm-jax interop's refusal. Float64 unless timed.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close, rel_err

from ttt import interop
from ttt.config import ConfigError, validate
from ttt.layers import MIXERS
from ttt.models import build_model, stack_layers, unstack_layers, without_diagnostics
from ttt.models.hybrid import Layer, layer_table, parse_pattern
from ttt.models.lm import Block, RMSNorm
from ttt.train import parallel
from ttt.train.transformer_init import init_ttt_from_transformer

# Layers 0 and 2: TTT-Linear on the Mamba backbone (a pre-conv in front, mini-batches of 4);
# 1 and 3: softmax attention with a 16-token KV cache. CHEAP: linear attention and softmax (what the
# tests that compile several programs use: a TTT layer's programs take longer to compile).
PATTERN = "ttt_linear_mamba,softmax"
KWARGS = {"stats": False, "mini_batch": 4, "softmax": {"cache_size": 16}}
CHEAP = dict(pattern="linear_attention,softmax", kwargs={"softmax": {"cache_size": 16}})


needs8 = pytest.mark.skipif(jax.device_count() < 8,
                            reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _lm(pattern=PATTERN, kwargs=None, **over):
    cfg = dict(kind="lm", preset="tiny", mixer="ttt_linear", pattern=pattern,
               mixer_kwargs=KWARGS if kwargs is None else kwargs, vocab_size=32, num_layers=4,
               width=16, num_heads=2, ffn_dim=32,
               dtype="float64" if jax.config.jax_enable_x64 else "float32")
    cfg.update(over)
    return build_model(cfg)


def _apply(model, method="__call__"):
    return jax.jit(functools.partial(model.apply, method=method))


def _ids(n=12, batch=2, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, n), 0, 32)


def _init(model, ids):
    return jax.jit(model.init)(jax.random.PRNGKey(1), ids)


def _abstract(model):
    return jax.eval_shape(model.init, jax.random.PRNGKey(1), _ids(8))


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


# ----------------------------------------------------------------------------- the config


def test_pattern_parsing_and_per_mixer_kwargs():
    assert parse_pattern("ttt_linear, ttt_linear,softmax") == ("ttt_linear", "ttt_linear",
                                                              "softmax")
    assert parse_pattern(["linear_attention", "softmax"]) == ("linear_attention", "softmax")
    assert parse_pattern("") == parse_pattern(None) == ()
    model = _lm()
    assert model.mixer == PATTERN and model.mixer_kwargs == ()
    # flat keys go to every entry that accepts them, per-name keys to that mixer only
    assert model.pattern == (
        Layer("ttt_linear_mamba", (("mini_batch", 4), ("stats", False)), True),
        Layer("softmax", (("cache_size", 16),), False))
    # model.pre_conv, when set, is every layer's
    assert [layer.pre_conv for layer in _lm(pre_conv=False).pattern] == [False, False]
    # without_diagnostics switches the TTT entries' stats off, and nothing else
    on = _lm(kwargs={"mini_batch": 4})
    assert dict(on.pattern[0].mixer_kwargs).get("stats") is None
    off = without_diagnostics(on)
    assert dict(off.pattern[0].mixer_kwargs)["stats"] is False
    assert off.pattern[1] == on.pattern[1]
    assert without_diagnostics(model) is model  # already off


@pytest.mark.parametrize("change, message", [
    (dict(pattern="ttt_linear,nope"), "model.pattern: unknown mixer 'nope'"),
    (dict(pattern="ttt_linear,softmax,softmax"), "3 entries, which must divide "
                                                 "model.num_layers=4"),
    (dict(pattern="ttt_linear,mttt_linear"), "'mttt_linear' is non-causal"),
    (dict(pattern="ttt_linear,softmax", kwargs={"lact": {"chunk": 4}}),
     "model.mixer_kwargs.lact: 'lact' is not in the pattern"),
    (dict(pattern="ttt_linear,softmax", kwargs={"softmax": 3}),
     "model.mixer_kwargs.softmax must be a dict"),
    (dict(pattern="ttt_linear,softmax", kwargs={"chunk": 4}),
     "model.mixer_kwargs.chunk: no mixer of the pattern"),
    (dict(pattern="ttt_linear,softmax", kwargs={"softmax": {"mini_batch": 4}}),
     "mixer 'softmax' (SoftmaxAttention) got unknown argument(s) ['mini_batch']"),
    (dict(pattern=3), "model.pattern must be a comma-separated string"),
])
def test_pattern_errors_are_one_line(change, message):
    kwargs = change.pop("kwargs", {})
    with pytest.raises(ValueError) as err:
        _lm(kwargs=kwargs, **change)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_config_validation_names_the_pattern():
    import toy

    config = toy.real_config("ttt_linear")
    with config.unlocked():
        config.model.pattern = "ttt_linear,softmax"
        config.model.mixer_kwargs = {"softmax": {"cache_size": 64}, "stats": False}
    validate(config, num_devices=1, process_count=1)
    with config.unlocked():
        config.model.pattern = "ttt_linear,swa_typo"
    with pytest.raises(ConfigError, match=r"^config.model.pattern='ttt_linear,swa_typo': "
                                          r"unknown mixer 'swa_typo'"):
        validate(config, num_devices=1, process_count=1)


def test_empty_or_single_pattern_is_the_plain_stack():
    ids = _ids(8)
    plain = _lm(pattern="", kwargs={"stats": False})
    assert plain.pattern == () and plain.mixer == "ttt_linear"
    ref = jax.eval_shape(plain.init, jax.random.PRNGKey(1), ids)
    for same in (_lm(pattern=None, kwargs={"stats": False}),
                 _lm(pattern="ttt_linear", kwargs={"stats": False}),
                 _lm(pattern=["ttt_linear"], kwargs={"ttt_linear": {"stats": False}})):
        assert same == plain  # the same module, hence the same parameters
        got = jax.eval_shape(same.init, jax.random.PRNGKey(1), ids)
        assert _shapes(got) == _shapes(ref)


# ----------------------------------------------------------------------------- the model


def test_params_layout_scanned_and_unrolled():
    scanned = _abstract(_lm())["params"]
    unrolled = _abstract(_lm(scan_layers=False))["params"]
    assert sorted(scanned["h"]) == ["pattern_0", "pattern_1"]
    assert sorted(unrolled["h"]) == ["0", "1", "2", "3"]
    # the unit's blocks inside the scanned stack, a leading (repeats,) axis on every leaf
    assert scanned["h"]["pattern_0"]["seq_modeling_block"]["wq"]["kernel"].shape == (2, 16, 16)
    assert "conv" in scanned["h"]["pattern_0"] and "conv" not in scanned["h"]["pattern_1"]
    assert "ttt_norm" in scanned["h"]["pattern_0"]["seq_modeling_block"]
    assert set(scanned["h"]["pattern_1"]["seq_modeling_block"]) == {"wq", "wk", "wv", "wo"}
    # layer i = block i mod 2 of repeat i // 2, in both layouts
    assert _shapes(unstack_layers(scanned)) == _shapes(unrolled)
    assert "conv" in unrolled["h"]["2"] and "conv" not in unrolled["h"]["3"]
    # stack_layers(unit=2) inverts unstack_layers, and layer 3 is repeat 1 of position 1
    real = jax.tree.map(lambda a: jnp.arange(a.size, dtype=a.dtype).reshape(a.shape), scanned)
    back = stack_layers(unstack_layers(real), unit=2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                    jax.tree.leaves(real), strict=True))
    np.testing.assert_array_equal(unstack_layers(real)["h"]["3"]["ffn_norm"]["kernel"],
                                  real["h"]["pattern_1"]["ffn_norm"]["kernel"][1])
    with pytest.raises(ValueError, match="not a multiple of the pattern's 3"):
        stack_layers(unstack_layers(real), unit=3)


@pytest.mark.parametrize("name", [n for n, spec in MIXERS.items() if spec.causal])
def test_every_causal_mixer_fits_a_pattern(name):
    """Traced only: the parameters and the decode cache of `name` beside softmax attention."""
    model = _lm(pattern=f"{name},softmax", kwargs={}, num_layers=2)
    variables = _abstract(model)
    params = variables["params"]["h"]
    assert sorted(params) == ["pattern_0", "pattern_1"]
    assert all(x.shape[0] == 1 for x in jax.tree.leaves(params))  # one repeat
    cache = jax.eval_shape(lambda v: model.apply(v, 2, method="init_cache"), variables)
    assert sorted(cache) == ["pattern_0", "pattern_1"]


def _by_hand(model, params, ids, order):
    """Embedding, then the blocks of the unrolled tree in `order`, then ln_f and tied logits."""
    h = params["wte"]["embedding"][ids]
    for i in order:
        layer = model.pattern[i % len(model.pattern)]
        block = Block(model.width, model.num_heads, model.ffn_dim, layer.mixer,
                      layer.mixer_kwargs, layer.pre_conv, dtype=model.dtype,
                      param_dtype=model.param_dtype)
        h, _ = block.apply({"params": params["h"][str(i)]}, h, 1.0)
    h = RMSNorm(dtype=model.dtype, param_dtype=model.param_dtype).apply(
        {"params": params["ln_f"]}, h)
    return h @ params["wte"]["embedding"].T


def test_forward_is_the_blocks_applied_in_order(x64):
    model, ids = _lm(scan_layers=False, **CHEAP), _ids()
    params = _init(model, ids)["params"]
    logits, aux = _apply(model)({"params": params}, ids)
    err = rel_err(logits, _by_hand(model, params, ids, [0, 1, 2, 3]))
    print(f"forward vs blocks by hand: relative error {err:.2e}")
    assert err < 1e-12
    assert set(aux) == {"pattern_0", "pattern_1"}
    # negative control: the same layers with each pair's order swapped
    assert rel_err(logits, _by_hand(model, params, ids, [1, 0, 3, 2])) > 1e-3


@pytest.mark.parametrize("scan", [True, False])
def test_prefill_then_steps_equals_forward(x64, scan):
    """Scanned: TTT-Linear (Mamba backbone, its pre-conv) + softmax; unrolled: CHEAP."""
    model = _lm(scan_layers=scan, **({} if scan else CHEAP))
    ids = _ids(12)
    variables = _init(model, ids)
    full, _ = _apply(model)(variables, ids)
    cache = model.apply(variables, 2, method="init_cache")
    assert set(cache) == {"pattern_0", "pattern_1"}  # each position its own cache type
    assert jax.tree.structure(cache["pattern_0"]) != jax.tree.structure(cache["pattern_1"])
    logits, cache = _apply(model, "prefill")(variables, ids[:, :5], cache)
    outs, step = [logits], _apply(model, "step")
    for t in range(5, 12):  # crosses the TTT mini-batch boundary at 8
        logits, cache = step(variables, ids[:, t:t + 1], cache)
        outs.append(logits)
    err = rel_err(jnp.concatenate(outs, axis=1), full)
    print(f"scan={scan}: prefill(5) + 7 steps vs forward, relative error {err:.2e}")
    assert err < 1e-10


def test_scanned_equals_unrolled_outputs_and_gradients(x64):
    ids = _ids(12)
    scanned, unrolled = _lm(**CHEAP), _lm(scan_layers=False, **CHEAP)
    params = _init(scanned, ids)["params"]
    loose = unstack_layers(params)

    def loss(model, p):
        logits, _ = model.apply({"params": p}, ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    a, aux_a = _apply(scanned)({"params": params}, ids)
    b, aux_b = _apply(unrolled)({"params": loose}, ids)
    assert_close(b, a, 1e-12, "unrolled vs scanned logits")
    assert jax.tree.structure(aux_a) == jax.tree.structure(aux_b)
    g_scan = jax.jit(jax.grad(lambda p: loss(scanned, p)))(params)
    g_loop = jax.jit(jax.grad(lambda p: loss(unrolled, p)))(loose)
    worst = assert_close(stack_layers(g_loop, unit=2), g_scan, 1e-10, "gradients")
    print(f"scanned vs unrolled gradients: worst relative error {worst:.2e}")


def test_remat_keeps_the_outputs_and_gradients():
    ids = _ids(8)
    model, remat = _lm(**CHEAP), _lm(remat="block", **CHEAP)
    params = _init(model, ids)["params"]

    def grad(m):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(m.apply({"params": p}, ids)[0])))(
            params)

    assert_close(grad(remat), grad(model), 1e-5, "remat vs none")


def test_layer_table_counts_each_position():
    model = _lm()
    params = _abstract(model)
    rows = layer_table(model, params, seq_len=64)
    assert [r["mixer"] for r in rows] == ["ttt_linear_mamba", "softmax"]
    assert [r["layers"] for r in rows] == [2, 2]
    stack = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["params"]["h"]))
    assert sum(r["params"] * r["layers"] for r in rows) == stack
    assert rows[1]["params"] == 4 * 16 * 16 + 2 * 16 + 3 * 16 * 32  # wq wk wv wo, norms, SwiGLU
    assert rows[1]["state"] == 2 * 64 * 16  # the softmax KV cache at 64 tokens: keys and values


# ----------------------------------------------------------------------------- training


def test_sharding_rules_match_the_hybrid_params():
    """Each parameter of position j gets the spec of the same parameter in a plain stack of that
    mixer (the rules match by name; the leading repeats axis stays whole)."""
    mesh = {"data": 1, "fsdp": 2, "model": 2}
    flat = parallel_flat(_abstract(_lm())["params"])
    ttt_kw = {"stats": False, "mini_batch": 4}
    plain = {j: parallel_flat(_abstract(_lm(pattern=name, kwargs=kw, num_layers=2))["params"])
             for j, (name, kw) in enumerate([("ttt_linear_mamba", ttt_kw), ("softmax", {})])}
    checked = 0
    for path, leaf in flat.items():
        if not path.startswith("h/pattern_"):
            continue
        j, rest = int(path.split("/")[1][len("pattern_"):]), "/".join(path.split("/")[2:])
        twin = plain[j][f"h/{rest}"]
        assert twin.shape == leaf.shape, path
        got = parallel.partition_spec(f"params/{path}", leaf.shape, mesh)
        assert got == parallel.partition_spec(f"params/h/{rest}", twin.shape, mesh), path
        checked += 1
    assert checked == len(jax.tree.leaves(_abstract(_lm())["params"]["h"]))
    wq = parallel.partition_spec("params/h/pattern_1/seq_modeling_block/wq/kernel", (2, 16, 16),
                                 mesh)
    assert wq == jax.sharding.PartitionSpec(None, "fsdp", "model")  # heads on model


def parallel_flat(params):
    return {parallel.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _train(root, name, **train):
    import toy

    from ttt.train.train import train_and_evaluate

    config = toy.real_config("ttt_linear", x64=True, steps=4, async_checkpoints=False, **train)
    with config.unlocked():
        config.model.pattern = CHEAP["pattern"]
        config.model.mixer_kwargs = CHEAP["kwargs"]
    workdir = os.path.join(root, name)
    train_and_evaluate(config, workdir, build_model=build_model, make_dataset=toy.make_dataset)
    return [json.loads(line)["train/loss"] for line in open(os.path.join(workdir,
                                                                          "metrics.jsonl"))]


def _greedy_from_the_run(workdir):
    """The run as `python -m ttt.sample` loads it (config.json, newest checkpoint): greedy
    `generate` (prefill + steps) continues the prompt as the forward's argmax does."""
    from ttt.models import generate
    from ttt.run import load

    run = load(workdir)
    assert [layer.mixer for layer in run.model.pattern] == ["linear_attention", "softmax"]
    assert sorted(run.params["h"]) == ["pattern_0", "pattern_1"]
    prompt = _ids(4, batch=1)
    out = generate(run.model, {"params": run.params}, prompt, 3, key=jax.random.PRNGKey(0),
                   greedy=True)
    logits, _ = _apply(run.model)({"params": run.params}, out[:, :-1])
    np.testing.assert_array_equal(out[:, 4:], jnp.argmax(logits[:, 3:], axis=-1))


@needs8
def test_hybrid_trains_and_shards_on_8_devices(tmp_path, x64):
    """The real trainer, 4 steps: the loss falls on one device, and the 2 x 2 x 2 mesh (data,
    fsdp, model: heads split) gives the same losses (to 1e-6: only summation order differs);
    the mesh run loads back and decodes."""
    single = _train(str(tmp_path), "single")
    mesh = _train(str(tmp_path), "mesh", parallel="mesh",
                  mesh={"data": 2, "fsdp": 2, "model": 2})
    print(f"losses: one device {single}, mesh {mesh}")
    _greedy_from_the_run(os.path.join(str(tmp_path), "mesh"))
    assert len(single) == len(mesh) == 4
    assert single[-1] < single[0] - 0.05
    for a, b in zip(mesh, single, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (mesh, single)


def test_compile_report_lists_each_position():
    import toy

    from ttt.train.compile_only import compile_report, format_report

    config = toy.real_config("ttt_linear", steps=3)
    with config.unlocked():
        config.model.update(num_layers=4, vocab_size=32)  # the vocabulary: no data opened
        config.model.pattern = ["linear_attention", "linear_attention", "linear_attention",
                                "softmax"]
    report = compile_report(config, lower_only=True)
    rows = report["layers"]
    assert [(r["layers"], r["mixer"]) for r in rows] == [(1, "linear_attention")] * 3 + [
        (1, "softmax")]
    assert rows[3]["state"] == 2 * 16 * 64  # keys and values of 16 tokens, width 64
    assert rows[0]["state"] < rows[3]["state"]
    text = format_report(report)
    assert "1 x softmax: 41,088 parameters and 2,048 floats of recurrent state" in text, text


# ----------------------------------------------------------------------------- the ViT


def test_vit_takes_the_noncausal_twins():
    cfg = dict(kind="vit", preset="tiny", mixer="mttt_linear", num_classes=3, image_size=8,
               patch_size=4, channels=1, num_layers=2, width=16, num_heads=2, mlp_dim=32,
               pattern="softmax,mttt_linear", mixer_kwargs={})
    model = build_model(cfg)
    assert [layer.mixer for layer in model.pattern] == ["softmax_noncausal", "mttt_linear"]
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    rngs = {"params": jax.random.PRNGKey(0), "inner": jax.random.PRNGKey(1)}
    variables = jax.jit(model.init)(rngs, images)
    apply = jax.jit(lambda m, v: m.apply(v, images, rngs={"inner": jax.random.PRNGKey(1)}),
                    static_argnums=0)
    blocks = variables["params"]["Transformer"]["encoderblock"]
    assert sorted(blocks) == ["pattern_0", "pattern_1"]
    assert blocks["pattern_0"]["seq_modeling_block"]["wq"]["kernel"].shape == (1, 16, 16)
    logits, aux = apply(model, variables)
    assert logits.shape == (2, 3) and set(aux) == {"pattern_0", "pattern_1"}
    loop = build_model({**cfg, "scan_layers": False})
    loose = unstack_layers(variables["params"], "encoderblock")
    assert sorted(loose["Transformer"]["encoderblock"]) == ["0", "1"]
    # the head is zero-initialised: compare the pooled features' path through a non-zero head
    head = {"kernel": jax.random.normal(jax.random.PRNGKey(2), (16, 3)), "bias": jnp.zeros(3)}
    a = apply(model, {"params": {**variables["params"], "head": head}})[0]
    b = apply(loop, {"params": {**loose, "head": head}})[0]
    assert rel_err(b, a) < 1e-5 and float(jnp.max(jnp.abs(a))) > 1e-3
    with pytest.raises(ValueError, match="'ttt_linear' has no non-causal twin for the ViT"):
        build_model({**cfg, "pattern": "ttt_linear,softmax"})


# ----------------------------------------------------------------------------- around the model


def test_transformer_init_copies_the_attention_layers():
    ids = _ids(8)
    common = dict(kind="lm", preset="tiny", mixer="softmax", vocab_size=32, num_layers=4,
                  width=16, num_heads=2, ffn_dim=32, dtype="float32")
    transformer = build_model({**common, "mixer_kwargs": {"cache_size": 16}})
    theirs = jax.jit(transformer.init)(jax.random.PRNGKey(7), ids)
    hybrid = {**common, "mixer": "ttt_linear", "pattern": "ttt_linear,softmax",
              "mixer_kwargs": {"stats": False}}
    model, variables = init_ttt_from_transformer(hybrid, theirs, seed=1)
    fresh = unstack_layers(jax.jit(model.init)(jax.random.PRNGKey(1), ids)["params"])
    ours, src = unstack_layers(variables["params"]), unstack_layers(theirs["params"])
    for i in range(4):
        mine, them = ours["h"][str(i)], src["h"][str(i)]
        for name in ("seq_norm", "ffn_norm", "feed_forward"):
            assert_close(mine[name], them[name], 0.0, f"layer {i} {name}")
        mixer = mine["seq_modeling_block"]
        for w in ("wq", "wk", "wv", "wo"):  # Q/K/V/O in every layer
            assert_close(mixer[w], them["seq_modeling_block"][w], 0.0, f"layer {i} {w}")
        if i % 2:  # attention layers: the whole mixer is the transformer's
            assert set(mixer) == set(them["seq_modeling_block"])
        else:  # TTT-only parameters keep their initial values
            assert_close(mixer["ttt_norm"], fresh["h"][str(i)]["seq_modeling_block"]["ttt_norm"],
                         0.0, f"layer {i} ttt_norm")
    assert_close(variables["params"]["wte"], theirs["params"]["wte"], 0.0, "embedding")
    assert sorted(variables["params"]["h"]) == ["pattern_0", "pattern_1"]  # the model's layout


def test_ttt_lm_jax_interop_refuses_hybrids(tmp_path):
    from ttt.train.init import initial_params

    model = _lm()
    variables = _abstract(model)
    with pytest.raises(ValueError, match=r"^export_ttt_lm_jax: a hybrid stack \(pattern "
                                         r"ttt_linear_mamba,softmax\) has no ttt-lm-jax"):
        interop.export_ttt_lm_jax(model, variables)
    import toy

    config = toy.real_config("ttt_linear")
    (tmp_path / "ckpt").write_bytes(b"")
    with config.unlocked():
        config.model.pattern = "ttt_linear,softmax"
        config.init = {"official_checkpoint": str(tmp_path / "ckpt")}
    with pytest.raises(ConfigError, match="a ttt-lm-jax checkpoint has one mixer in every layer"):
        initial_params(config, None)


def test_sample_checks_the_smallest_kv_cache():
    from ttt.sample import _kv_cache_size

    assert _kv_cache_size(_lm()) == 16
    assert _kv_cache_size(_lm(pattern="ttt_linear,linear_attention",
                              kwargs={"stats": False})) is None


def test_a_per_mixer_argument_can_be_set_on_the_command_line():
    """--config.model.mixer_kwargs.swa.window=8 creates the per-mixer dict inside the free-form
    mixer_kwargs; outside a free-form section a missing key is still an error."""
    from ttt import cli
    from ttt.cli import UsageError
    from ttt.config import with_defaults

    config = with_defaults(cli.load_config("experiments/lm.py:ttt_linear,smoke"))
    cli.apply_overrides(config, [("model.pattern", "ttt_linear,swa"),
                                 ("model.mixer_kwargs.swa.window", "8")])
    assert config.model.mixer_kwargs.swa.window == 8
    with pytest.raises(UsageError, match="nosuch"):
        cli.apply_overrides(config, [("model.nosuch.window", "8")])
