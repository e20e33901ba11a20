"""`python -m ttt.sample` on bad inputs and long generations: a non-UTF-8 prompt, a config.json that
is JSON but not a run's, a non-finite temperature, a negative top_k and more tokens than the model
can reach are one line and exit 2; long generations stream their text chunk by chunk
(`generate_chunks`, held equal to `generate`) with a progress bar on stderr when stdout is not a
terminal. Real tiny LM with random weights (`fake_run`: no training).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_use_run import fake_run

import ttt.sample
from ttt.data.tokenizers import ByteTokenizer
from ttt.models import build_model, generate
from ttt.models.generate import generate_chunks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config, params = fake_run(workdir)
    return workdir, build_model(config.model), params


@pytest.mark.parametrize("kw, chunks", [
    (dict(temperature=0.7), (3,)),
    pytest.param(dict(greedy=True), (1, 3, 7, 256), marks=pytest.mark.slow),
    pytest.param(dict(temperature=2.0, top_k=5), (1, 3, 7, 256), marks=pytest.mark.slow),
], ids=["sampled", "greedy", "top_k"])
def test_generate_chunks_equal_generate(run, kw, chunks):
    _, model, params = run
    variables = {"params": params}
    prompt = jnp.array([[104, 105, 32], [116, 116, 116]], jnp.int32)  # (B=2, 3)
    key = jax.random.PRNGKey(7)
    whole = np.asarray(generate(model, variables, prompt, 7, key=key, **kw))[:, 3:]  # (2, 7)
    for chunk in chunks:
        parts = list(generate_chunks(model, variables, prompt, 7, key=key, chunk=chunk, **kw))
        assert [p.shape[1] for p in parts] == [min(chunk, 7 - i) for i in range(0, 7, chunk)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole, err_msg=str(chunk))
    if not kw.get("greedy"):  # negative control: another key gives other tokens
        other = np.concatenate(list(generate_chunks(model, variables, prompt, 7, chunk=3, **kw,
                                                    key=jax.random.PRNGKey(8))), axis=1)
        assert (other != whole).any()
    assert list(generate_chunks(model, variables, prompt, 0, key=key, **kw)) == []


def test_text_stream_never_splits_a_character():
    tok, text = ByteTokenizer(), "naïve café — 日本語 ok"
    ids = tok.encode(text)
    stream = ttt.sample.TextStream(tok)
    pieces = [stream.add([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # negative control: decoding each token on its own breaks the multi-byte characters
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)


def _sample(capsys, *argv):
    rc = ttt.sample.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


BAD = [  # (argv after --workdir, fragment of the one line)
    (["--prompt=ab\udcffc"], "--prompt: not UTF-8 text (byte 0xff at position 2)"),
    (["--prompt=hi", "--temperature=nan"], "--temperature=nan: must be >= 0 and finite"),
    (["--prompt=hi", "--temperature=inf"], "--temperature=inf: must be >= 0 and finite"),
    (["--prompt=hi", "--temperature=-1"], "--temperature=-1.0: must be >= 0 and finite"),
    (["--prompt=hi", "--top_k=-1"], "--top_k=-1: must be >= 0"),
    (["--prompt=hi", "--max_tokens=0"], "--max_tokens=0: must be at least 1"),
    (["--prompt=hi", "--max_tokens=3000000000"],
     "--max_tokens=3000000000: the prompt (2 tokens) plus the continuation exceed the "
     "2147483647 positions"),
]


@pytest.mark.parametrize("argv, fragment", BAD, ids=[f[:20] for _, f in BAD])
def test_bad_sampling_inputs_are_one_line(run, capsys, argv, fragment):
    rc, out, err = _sample(capsys, f"--workdir={run[0]}", *argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], (rc, err)
    assert "Traceback" not in err and not out


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2]", "is JSON but not a run config"),
    ("3", "is JSON but not a run config"),
    ('{"a": 1}', "is JSON but not a run config written by python -m ttt.main; point --workdir at "
                 "a run directory (no model section)"),
    ('{"model": {"kind": "lm"}, "data": {}, "optim": {}, "train": {}}', "(no model.mixer)"),
])
def test_config_json_that_is_not_a_run_is_one_line(tmp_path, capsys, text, fragment):
    (tmp_path / "config.json").write_text(text)
    rc, out, err = _sample(capsys, f"--workdir={tmp_path}", "--prompt=hi")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and fragment in lines[0], (rc, err)
    assert "Traceback" not in err and not out
    assert (tmp_path / "config.json").read_text() == text


def test_long_generation_streams_with_progress(run, capsys, monkeypatch):
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdout", Out())
    monkeypatch.setattr(ttt.sample, "CHUNK", 8)  # "long": more than 4 chunks
    rc = ttt.sample.main([f"--workdir={run[0]}", "--prompt=x", "--max_tokens=40",
                          "--temperature=0"])
    err = capsys.readouterr().err
    assert rc == 0, err
    pieces = [w for w in writes if w and w != "\n"]
    assert len(pieces) >= 4, pieces  # 5 chunks of 8, shown as they come
    assert "token" in err and "40 tokens from" in err, err[-500:]  # the bar, then the summary
    assert "\x00" not in "".join(pieces)


def test_non_utf8_prompt_through_a_real_process(run):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "ttt.sample", f"--workdir={run[0]}".encode(),
                           b"--prompt=\xff\xfe"], env=env, cwd=ROOT, capture_output=True,
                          timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and not proc.stdout, err
    assert err.strip() == ("error: --prompt: not UTF-8 text (byte 0xff at position 0); pass the "
                           "prompt as UTF-8"), err
