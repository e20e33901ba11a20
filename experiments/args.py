"""The one parser of the experiment configs' argument strings (`experiments/<task>.py:<arg>`).

An argument is comma-separated tokens in any order; each config declares its `Grammar`:
  <name>      at most one positional name from a known set (registry mixers, ablation rungs);
              `aliases` are other spellings of names (the ladder's 1..8)
  <preset>    at most one model size
  <flag>      a bare word that switches something on (smoke, cpu, paper, ...)
  <choice>    a bare word from a small closed set that sets a key (gd | sgd -> mode)
  key=value   a typed option (ctx=8k, T=4, n=256)
Anything else, a bad value, or a key given twice with different values fails with one line that
lists what is known: a typo like `smok` or `125M` never becomes a mixer name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ml_collections import config_dict

from ttt.layers import MIXERS


def positive_int(value: str) -> int:
    """'256' -> 256; zero, negative and non-integers are rejected."""
    out = int(value)
    if out <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return out


def non_negative_int(value: str) -> int:
    """'0' -> 0, '4' -> 4; negative and non-integers are rejected."""
    out = int(value)
    if out < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return out


def tokens(value: str) -> int:
    """A token count: '2048', '2k' (= 2048), '32K'."""
    value = value.lower()
    return positive_int(value[:-1]) * 1024 if value.endswith("k") else positive_int(value)


def one_of(*allowed: str) -> Callable[[str], str]:
    """Option type: one of a closed set of spellings."""
    def parse(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return value
    return parse


def unset(kind: type) -> config_dict.FieldReference:
    """A config field that holds None until set, typed so `--config.a.b=value` can set it."""
    return config_dict.placeholder(kind)


def mixer_names(causal_only: bool) -> tuple[str, ...]:
    """Registry names a config may name: the causal ones for an LM, all of them for a ViT."""
    return tuple(name for name, spec in MIXERS.items() if spec.causal or not causal_only)


@dataclasses.dataclass(frozen=True)
class Grammar:
    """The tokens one config accepts; `parse(arg)` -> dict of every key (defaults filled in)."""

    prog: str  # the config's name in messages ("lm config: ...")
    names: tuple[str, ...] | Callable[[], tuple[str, ...]]  # a callable: read at every parse
    default: str
    name_key: str = "mixer"
    name_label: str = "mixers"
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    flags: tuple[str, ...] = ()
    presets: tuple[str, ...] = ()
    preset_default: str | None = None
    choices: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    options: Mapping[str, Callable[[str], Any]] = dataclasses.field(default_factory=dict)

    def name_list(self) -> tuple[str, ...]:
        """The accepted names now (a registry's names include entries registered since import)."""
        return tuple(self.names()) if callable(self.names) else self.names

    def known(self) -> str:
        """One line listing every accepted token."""
        names = f"{self.name_label}: {', '.join(self.name_list())}"
        if self.aliases:
            names += f" (or {', '.join(self.aliases)})"
        parts = [names]
        if self.presets:
            parts.append(f"presets: {', '.join(self.presets)}")
        if self.flags:
            parts.append(f"flags: {', '.join(self.flags)}")
        parts += [f"{key}: {' | '.join(words)}" for key, words in self.choices.items()]
        if self.options:
            parts.append(f"options: {', '.join(f'{k}=' for k in self.options)}")
        return "; ".join(parts)

    def _token(self, token: str) -> tuple[str, Any]:
        """(key, value) one token sets; ValueError if the token means nothing here."""
        if token in self.flags:
            return token, True
        if token in self.presets:
            return "preset", token
        for key, words in self.choices.items():
            if token in words:
                return key, token
        if token in self.name_list() or token in self.aliases:
            return self.name_key, self.aliases.get(token, token)
        key, eq, value = token.partition("=")
        if eq and key in self.options:
            try:
                return key, self.options[key](value)
            except ValueError as err:
                raise ValueError(f"{self.prog} config: {token!r}: {err}") from None
        what = f"unknown key {key!r}" if eq else f"unknown token {token!r}"
        raise ValueError(f"{self.prog} config: {what}; known {self.known()}")

    def parse(self, arg: str | None) -> dict[str, Any]:
        """'ttt_mlp,125m,ctx=8k' -> {"mixer": "ttt_mlp", "preset": "125m", "ctx": 8192, ...}."""
        given: dict[str, Any] = {}
        for token in filter(None, (t.strip() for t in (arg or "").split(","))):
            key, value = self._token(token)
            if key in given and given[key] != value:
                raise ValueError(f"{self.prog} config: {key} given twice ({given[key]!r} and "
                                 f"{value!r}) in {arg!r}; give one")
            given[key] = value
        out = {self.name_key: self.default, "preset": self.preset_default,
               **{flag: False for flag in self.flags},
               **{key: None for key in [*self.choices, *self.options]}}
        return {**out, **given}
