"""Every numeric config field has a domain (`ttt.config.DOMAINS`), checked before anything is built.

Table-driven: every numeric field of every shipped experiment config (its default tokens) must
have a domain, and each value just outside it (below / above the bounds, NaN, inf, a fraction
for a count, None where None is not allowed) is refused by `resolve_config` in one line naming
the field. A model vocabulary smaller than the dataset's is refused the same way. A few of them
through the command line: exit 2, one line, no traceback, nothing written in the workdir.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import ml_collections as mlc
import pytest

from experiments.specs import load_config
from ttt import main as ttt_main
from ttt.config import DOMAINS, ConfigError, Domain, validate
from ttt.train.setup import abstract_meta, resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("lm", "vit", "mqar", "ablation")


def _numeric_fields(node, prefix=""):
    """Dotted keys of the int / float leaves of a ConfigDict, typed None placeholders included
    (the free-form mixer_kwargs are checked by the mixer itself)."""
    out = []
    for key in node.keys():
        value, dotted = node[key], f"{prefix}{key}"
        if isinstance(value, mlc.ConfigDict):
            if dotted != "model.mixer_kwargs":
                out += _numeric_fields(value, dotted + ".")
            continue
        ref = node._fields.get(key)
        kind = ref.get_type() if isinstance(ref, mlc.FieldReference) else type(value)
        if kind in (int, float) and not isinstance(value, bool):
            out.append(dotted)
    return out


def _with(config, key, value):
    """An untyped copy of `config` with `key` set (a typed field would refuse a wrong type)."""
    tree = copy.deepcopy(config.to_dict())
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return mlc.ConfigDict(tree)


@pytest.fixture(scope="module")
def shipped():
    """{name: (config, dataset meta)} of every experiment file with its default tokens."""
    out = {}
    for name in SHIPPED:
        config = load_config(os.path.join(ROOT, "experiments", f"{name}.py"))
        meta = ({"vocab_size": 256, "seq_len": 8} if config.data.name == "tfds_text" and
                config.model.vocab_size is None else abstract_meta(config))
        out[name] = (config, meta)
    return out


def test_every_numeric_field_of_every_shipped_config_has_a_domain(shipped):
    seen = set()
    for name, (config, _) in shipped.items():
        fields = _numeric_fields(config)
        missing = [f for f in fields if f not in DOMAINS]
        assert not missing, f"{name}: numeric fields without a domain in DOMAINS: {missing}"
        seen.update(fields)
    assert {"optim.lr", "optim.b2", "train.label_smoothing", "model.vocab_size"} <= seen
    # each shipped value lies inside its domain
    for config, meta in shipped.values():
        resolve_config(config, meta)
        validate(config, num_devices=8, process_count=1)


def test_every_out_of_domain_value_is_refused_naming_the_field(shipped):
    tried = 0
    for name, (config, meta) in shipped.items():
        for key in _numeric_fields(config):
            for bad in DOMAINS[key].outside():
                with pytest.raises(ConfigError) as err:
                    resolve_config(_with(config, key, bad), meta)
                message = str(err.value)
                assert message.startswith(f"config.{key}={bad!r}: must be "), (name, message)
                assert "\n" not in message
                tried += 1
    assert tried > 300, tried


def test_domain_bounds_and_text():
    rate = DOMAINS["optim.lr"]
    assert rate.reason(3e-3) is None and rate.reason(1) is None
    for bad in (0.0, -1e-3, math.nan, math.inf, True, "0.1", None):
        assert rate.reason(bad), bad
    beta = DOMAINS["optim.b2"]
    assert beta.reason(0.0) is None and beta.reason(0.999) is None and beta.reason(1.0)
    assert beta.describe() == "a finite number in [0, 1)"
    axis = DOMAINS["train.mesh.data"]
    assert axis.reason(-1) is None and axis.reason(4) is None and axis.reason(-2)
    assert DOMAINS["optim.clip"].reason(None) is None and DOMAINS["optim.clip"].reason(-1.0)
    assert DOMAINS["model.width"].reason(None) is None and DOMAINS["model.width"].reason(0)
    # negative control: a domain that forgot its open bound lets the bound itself through
    assert Domain(float, 0.0).reason(0.0) is None and rate.reason(0.0)


def test_model_vocabulary_smaller_than_the_data_is_refused(shipped):
    config, meta = shipped["lm"]
    assert meta["vocab_size"] >= 256  # bytes
    with pytest.raises(ConfigError, match=r"^config\.model\.vocab_size=100: smaller than the "
                                          r"dataset's 2\d\d "):
        resolve_config(_with(config, "model.vocab_size", 100), meta)
    resolve_config(_with(config, "model.vocab_size", meta["vocab_size"]), meta)  # equal is fine
    config, meta = shipped["mqar"]
    with pytest.raises(ConfigError, match=r"^config\.model\.vocab_size=8000: .*8192"):
        resolve_config(_with(config, "model.vocab_size", 8000), meta)


LM = os.path.join(ROOT, "experiments", "lm.py")
CLI_CASES = [  # (override, fragment of the one line)
    ("--config.optim.lr=nan", "config.optim.lr=nan: must be a finite number in (0, inf)"),
    ("--config.optim.lr=inf", "config.optim.lr=inf: must be"),
    ("--config.optim.b2=1.0", "config.optim.b2=1.0: must be a finite number in [0, 1)"),
    ("--config.optim.eps=0", "config.optim.eps=0.0: must be"),
    ("--config.optim.clip=-1", "config.optim.clip=-1.0: must be"),
    ("--config.optim.weight_decay=-0.1", "config.optim.weight_decay=-0.1: must be"),
    ("--config.train.label_smoothing=1", "config.train.label_smoothing=1.0: must be"),
    ("--config.optim.ttt_lr_mult_init=0", "config.optim.ttt_lr_mult_init=0.0: must be"),
    ("--config.model.vocab_size=100", "config.model.vocab_size=100: smaller than the dataset's"),
]


@pytest.mark.parametrize("override, fragment", CLI_CASES)
def test_cli_refuses_out_of_domain_values_in_one_line(tmp_path, capsys, override, fragment):
    workdir = tmp_path / "work"
    rc = ttt_main.main([f"--config={LM}:ttt_linear,smoke", f"--workdir={workdir}", override])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert fragment in lines[0] and "Traceback" not in err and not out.strip(), lines
    # nothing written: the workdir is absent, or (past the data, for the vocabulary) empty
    assert not workdir.exists() or not os.listdir(workdir), os.listdir(workdir)


def test_cli_refusal_through_a_real_process(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "ttt.main", f"--config={LM}:ttt_linear,smoke",
         f"--workdir={tmp_path / 'work'}", "--config.optim.lr=nan"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and not proc.stdout.strip(), proc.stderr
    assert proc.stderr.strip() == ("error: config.optim.lr=nan: must be a finite number in "
                                   "(0, inf)"), proc.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("key, value, fragment", [
    ("optim.name", "sgd", "config.optim.name='sgd': only 'adamw' is supported"),
    ("optim.weight_decay_mask", "biases", "config.optim.weight_decay_mask='biases': must be 'all' "
                                          "or 'matrices'"),
])
def test_choice_fields_are_checked_before_building(shipped, key, value, fragment):
    config = _with(shipped["lm"][0], key, value)
    with pytest.raises(ConfigError) as err:
        validate(config, num_devices=8, process_count=1)
    assert str(err.value) == fragment
