"""`python -m ttt.main --list[=section]`: the catalogue of configs, mixers, presets and fields."""

from __future__ import annotations

import pathlib

import pytest

from ttt import main as ttt_main
from ttt.config import DOMAINS
from ttt.layers import MIXERS
from ttt.models.presets import PRESETS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture()
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _list(capsys, *args) -> str:
    assert ttt_main.main(["--list", *args] if not args or not args[0].startswith("--list=")
                         else list(args)) == 0
    return capsys.readouterr().out


def test_the_whole_catalogue(in_root, capsys):
    out = _list(capsys)
    for section in ("== configs", "== mixers", "== presets", "== fields"):
        assert section in out
    mixer_lines = {line.split(":")[0] for line in out.split("== mixers")[1].split("==")[0]
                   .splitlines() if ":" in line}
    assert set(MIXERS) <= mixer_lines  # every registry entry, one line each
    assert "--config=experiments/lm.py:<tokens>" in out and "gated_deltanet" in out
    for name in PRESETS["lm"]:
        assert f"lm {name}: num_layers=" in out
    assert "config.optim.lr = " in out and DOMAINS["optim.lr"].describe() in out


def test_one_section_and_the_facts_of_a_mixer(in_root, capsys):
    out = _list(capsys, "--list=mixers")
    assert "== configs" not in out and "== fields" not in out
    line = next(l for l in out.splitlines() if l.startswith("softmax:"))
    assert "decodes" in line and "twin softmax_noncausal" in line and "at N=4k" in line
    line = next(l for l in out.splitlines() if l.startswith("ttt_linear:"))
    assert "state 49,920" in line  # 12 heads × (64 × 64 + 64) at width 768


def test_imported_mixers_are_listed(in_root, capsys):
    out = _list(capsys, "--list=mixers", "--import=experiments/examples/ema_mixer.py")
    assert any(l.startswith("ema: decodes; state 768;") for l in out.splitlines())


def test_a_bad_section_is_one_line(in_root, capsys):
    assert ttt_main.main(["--list=nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "configs, mixers, presets, fields" in err


def test_help_points_to_the_catalogue(capsys):
    assert ttt_main.main(["--help"]) == 0
    assert "--list" in capsys.readouterr().out


def test_lowercase_booleans_on_an_untyped_field_are_booleans():
    """--config.model.pre_conv=true / false on a field without a type (a None default) are the
    booleans, not the words (a non-empty string would switch the option on either way)."""
    from ttt import cli

    assert cli.parse_value("true", None, "--config.model.pre_conv") is True
    assert cli.parse_value("false", None, "--config.model.pre_conv") is False
    assert cli.parse_value("False", None, "--config.model.pre_conv") is False
    assert cli.parse_value("swa", None, "--config.x") == "swa"  # other words stay words
