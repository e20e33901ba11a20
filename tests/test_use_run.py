"""Using a run: `ttt.load_run`, `python -m ttt.sample`, `python -m ttt.evaluate`, a workdir that
holds another model, and new runs started from weights (another run, a trained Transformer, an
official ttt-lm-jax checkpoint file). Real tiny LMs (1 block, width 16, 2 heads, 16 tokens).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from official_trees import fake_official_tree, write_streaming_checkpoint

import ttt
import ttt.evaluate
import ttt.main
import ttt.sample
from experiments import lm
from ttt.config import ConfigError, with_defaults
from ttt.data import make_dataset
from ttt.data.tokenizers import ByteTokenizer
from ttt.models import build_model
from ttt.train import Checkpointer
from ttt.train import init as init_lib
from ttt.train.setup import abstract_state, build_setup, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = os.path.join(ROOT, "experiments", "lm.py")
TINY = ["--config.model.num_layers=1", "--config.model.width=16", "--config.model.num_heads=2",
        "--config.model.ffn_dim=32", "--config.data.seq_len=16"]
META = {"vocab_size": 257, "seq_len": 16}


def _config(mixer="ttt_linear", **model):
    config = with_defaults(lm.get_config(f"{mixer},smoke"))
    config.model.update({**dict(num_layers=1, width=16, num_heads=2, ffn_dim=32), **model})
    config.data.seq_len = 16
    return resolve_config(config, META)


def fake_run(workdir, mixer="ttt_linear", seed=0, **model):
    """A run directory as the trainer leaves one (config.json, a checkpoint at step 5) holding
    random parameters: no training needed."""
    config = _config(mixer, **model)
    setup = build_setup(config, META, build_model)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: rng.normal(0.0, 0.5, a.shape).astype(a.dtype),
                          abstract_state(setup).params)
    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    ckpt.save(5, setup.create_state(params), {"next_index": 5})
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    return config, params


def _target(config):
    return abstract_state(build_setup(config, META, build_model)).params


def _with_init(config, **init):
    config = config.copy_and_resolve_references()
    config.init.update(init)
    return config


def _equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb, strict=True))


def _flat(params):
    from ttt.interop import trees

    return trees.flatten(jax.tree.map(np.asarray, params))


def test_load_run_gives_the_checkpoint(tmp_path):
    config, params = fake_run(tmp_path)
    model, loaded, loaded_config = ttt.load_run(str(tmp_path))
    assert _equal(loaded, params) and loaded_config.model.to_dict() == config.model.to_dict()
    logits, _ = model.apply({"params": loaded}, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, 257)
    with pytest.raises(ConfigError, match="has no checkpoint 6"):
        ttt.load_run(str(tmp_path), step=6)
    assert os.listdir(tmp_path / "checkpoints") == ["5"]  # read, nothing written


def test_init_sources_and_their_mismatches(tmp_path):
    run, sm, official = tmp_path / "run", tmp_path / "transformer", tmp_path / "official.msgpack"
    for d in (run, sm):
        d.mkdir()
    _, params = fake_run(run)
    config = _config()
    started, what = init_lib.initial_params(_with_init(config, from_workdir=str(run)),
                                            _target(config))
    assert _equal(started, params) and "a fresh optimizer" in what
    wide = _config(width=32, num_heads=2)
    with pytest.raises(ConfigError) as err:
        init_lib.initial_params(_with_init(wide, from_workdir=str(run)), _target(wide))
    assert str(err.value).startswith(f"config.init.from_workdir={str(run)!r}: ")
    assert "do not fit" in str(err.value) and "\n" not in str(err.value)

    # a trained Transformer of the same size: shared weights copied, TTT-only ones initialised
    _, sm_params = fake_run(sm, mixer="softmax", seed=1)
    started, _ = init_lib.initial_params(_with_init(config, transformer_workdir=str(sm)),
                                         _target(config))
    ours, theirs = _flat(started), _flat(sm_params)
    for key in ("wte/embedding", "h/seq_modeling_block/wq/kernel", "h/feed_forward/w2/kernel"):
        assert np.array_equal(ours[key], theirs[key]), key
    assert np.all(ours["h/seq_modeling_block/ttt_norm/scale"] == 1.0)  # initial value
    with pytest.raises(ConfigError, match="that run's mixer is 'ttt_linear'"):
        init_lib.initial_params(_with_init(config, transformer_workdir=str(run)),
                                _target(config))

    # an official ttt-lm-jax checkpoint file (Mamba backbone, linear learner, b = 16)
    tree = jax.tree.map(lambda a: a.astype(np.float32), fake_official_tree(
        learner="linear", backbone="mamba", vocab=257, layers=1, width=16, heads=2, ffn=32,
        mini_batch=16))
    write_streaming_checkpoint(official, {"step": np.int32(3), "params": tree})
    mamba = _config("ttt_linear_mamba")
    started, _ = init_lib.initial_params(_with_init(mamba, official_checkpoint=str(official)),
                                         _target(mamba))
    from ttt import interop

    _, expected = interop.import_ttt_lm_jax(tree)
    assert _equal(started, expected["params"])
    with pytest.raises(ConfigError) as err:  # a transformer-backbone model has wk, no conv
        init_lib.initial_params(_with_init(config, official_checkpoint=str(official)),
                                _target(config))
    assert "official_checkpoint" in str(err.value) and "do not fit" in str(err.value)


def _lm_nll(model, params, batch):
    """Masked mean next-token loss of `batch`, straight from the model's logits."""
    logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, batch["inputs"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64))
    nll = -np.take_along_axis(np.asarray(logp), batch["targets"][..., None], -1)[..., 0]
    return float((nll * batch["mask"]).sum() / batch["mask"].sum())


def test_a_trained_run_sample_evaluate_guard_and_restart(tmp_path, capsys):
    work = tmp_path / "lm"
    train = [f"--config={LM}:ttt_linear,smoke", *TINY, "--config.train.checkpoint_every=3",
             "--config.train.progress=false"]
    assert ttt.main.main([*train, f"--workdir={work}", "--config.train.steps=3",
                          "--config.train.eval_every=3"]) == 0
    capsys.readouterr()
    model, params, config = ttt.load_run(str(work))

    # sampling: greedy decoding (prefill + steps) == argmax of the full forward, token by token
    prompt = b"def f("
    assert ttt.sample.main([f"--workdir={work}", "--prompt=def f(", "--max_tokens=6",
                            "--temperature=0"]) == 0
    out = capsys.readouterr().out
    ids = np.zeros((1, len(prompt) + 6), np.int32)
    ids[0, :len(prompt)] = list(prompt)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    for t in range(len(prompt), ids.shape[1]):  # causal: later (zero) tokens do not matter
        ids[0, t] = int(np.argmax(forward(params, ids)[0, t - 1]))
    assert out == ByteTokenizer().decode(ids[0, len(prompt):]) + "\n"
    sampled = [ttt.sample.main([f"--workdir={work}", "--prompt=x", "--max_tokens=5",
                                "--temperature=0.8", "--top_k=5", "--seed=3"]),
               capsys.readouterr().out, ttt.sample.main([f"--workdir={work}", "--prompt=x",
                                                         "--max_tokens=5", "--temperature=0.8",
                                                         "--top_k=5", "--seed=3"]),
               capsys.readouterr().out]
    assert sampled[0] == sampled[2] == 0 and sampled[1] == sampled[3]  # seeded

    # evaluation: the whole-split numbers equal a direct computation over the same windows
    assert ttt.evaluate.main([f"--workdir={work}", "--max_batches=2"]) == 0
    assert "validation: loss" in capsys.readouterr().out
    result = json.load(open(work / "eval" / "validation_max2.json"))  # one file per setting
    batches = list(zip(range(2), make_dataset(config.data, "validation", 8, seed=0).iterator(),
                       strict=False))
    batch = {k: np.concatenate([b[k] for _, b in batches]) for k in batches[0][1]}
    assert rel_err(result["loss"], _lm_nll(model, params, batch)) < 1e-5
    assert result["tokens"] == int(batch["mask"].sum()) and result["seq_len"] == 16
    by_pos, counts = np.array(result["loss_by_position"]), np.array(result["tokens_by_position"])
    assert rel_err((by_pos * counts).sum() / counts.sum(), result["loss"]) < 1e-9
    assert os.path.getsize(work / "eval" / "validation_max2_loss_by_position.png") > 5000
    assert ttt.evaluate.main([f"--workdir={work}", "--max_batches=1", "--seq_len=32",
                              "--split=test"]) == 0
    assert json.load(open(work / "eval" / "test_seq32_max1.json"))["seq_len"] == 32

    # the same workdir with another model: refused before anything is touched
    before = {f: open(work / f, "rb").read() for f in ("config.json", "metrics.jsonl")}
    capsys.readouterr()
    assert ttt.main.main([f"--config={LM}:ttt_mlp,smoke", *TINY, f"--workdir={work}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.mixer: 'ttt_linear' there, 'ttt_mlp' here" in err[0], err
    assert before == {f: open(work / f, "rb").read() for f in before}
    assert os.listdir(work / "checkpoints") == ["3"]
    assert not os.path.exists(work / "corrupt_checkpoints")

    # a new run from this one's parameters: its first loss is theirs on its first batch
    fresh = tmp_path / "ft"
    assert ttt.main.main([*train, f"--workdir={fresh}", f"--config.init.from_workdir={work}",
                          "--config.train.steps=1", "--config.train.eval_every=0"]) == 0
    assert f"new run from the parameters of {work} (step 3)" in capsys.readouterr().err
    first = json.loads(open(fresh / "metrics.jsonl").readline())["train/loss"]
    batch0 = next(make_dataset(config.data, "train", 8, seed=0).iterator())
    assert rel_err(first, _lm_nll(model, params, batch0)) < 1e-5
    own = json.loads(open(work / "metrics.jsonl").readline())["train/loss"]
    assert rel_err(first, own) > 1e-3  # negative control: not the fresh initialisation's loss


@pytest.mark.slow  # two more compilations of a training step
def test_new_runs_from_a_transformer_and_an_official_checkpoint(tmp_path, capsys):
    sm, official = tmp_path / "sm", tmp_path / "streaming_params"
    sm.mkdir()
    fake_run(sm, mixer="softmax", seed=1)
    tree = fake_official_tree(learner="linear", backbone="mamba", vocab=257, layers=1, width=16,
                              heads=2, ffn=32, mini_batch=16)
    write_streaming_checkpoint(official, tree["params"], float_dtype=jnp.bfloat16)
    common = [*TINY, "--config.train.steps=1", "--config.train.eval_every=0",
              "--config.train.progress=false"]
    assert ttt.main.main([f"--config={LM}:ttt_linear,smoke", *common,
                          f"--workdir={tmp_path / 'a'}",
                          f"--config.init.transformer_workdir={sm}"]) == 0
    assert "new run from the Transformer run" in capsys.readouterr().err
    assert ttt.main.main([f"--config={LM}:ttt_linear_mamba,smoke", *common,
                          f"--workdir={tmp_path / 'b'}",
                          f"--config.init.official_checkpoint={official}"]) == 0
    assert "new run from the ttt-lm-jax checkpoint" in capsys.readouterr().err
    rc = ttt.main.main([f"--config={LM}:ttt_linear,smoke", *common, f"--workdir={tmp_path / 'c'}",
                        f"--config.init.official_checkpoint={official}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "do not fit this model" in err[0], err
