"""What the command lines share: flags, config files with `--config.<key>=value` overrides, and one
error style (`error: <what to change>` on one line, exit status 2; `--debug` adds the traceback).

  flags:      --name=value, --name value, --flag / --noflag for booleans, --help
  config:     --config=path/to/file.py[:arg]  -> the file's get_config(arg)
  overrides:  --config.train.steps=20, --config.model.width=96, --config.data.randaug=2,15,
              --config.model.mixer_kwargs.mini_batch=8 (keys may be added under mixer_kwargs)

Overrides are typed by the field they replace (int, float, bool, str, tuple, dict; fields whose
default is None take a Python literal, else the text), and a key that does not exist is refused
with the nearest known key (except the free-form mixer_kwargs and the keys of ttt.config.ADDABLE,
e.g. data.paths when switching --config.data.name=text_files). Nothing here imports JAX, so a
bad flag is reported in a fraction of a second.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import importlib.util
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ttt.config import ADDABLE, ConfigError
from ttt.errors import out_of_memory_error

# Sections whose keys are free-form (checked later by the code that reads them).
FREE_FORM = ("model.mixer_kwargs", "data.splits")


class UsageError(ConfigError):
    """A bad flag or override: the message names it and what to change."""


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    type: type  # str, int, float or bool
    default: Any = None
    help: str = ""
    required: bool = False


DEBUG = Flag("debug", bool, False, "print the traceback of an error as well")


def _near(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert_flag(flag: Flag, text: str):
    if flag.type is bool:
        return _parse_bool(text, f"--{flag.name}")
    try:
        return flag.type(text)
    except ValueError:
        raise UsageError(f"--{flag.name}={text}: expected {_type_name(flag.type)}") from None


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "text",
            tuple: "a tuple such as 2,15", list: "a list such as [1, 2]",
            dict: "a dict such as {'key': 1}"}.get(t, t.__name__)


def _parse_bool(text: str, what: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{what}={text}: expected true or false")


def usage(prog: str, doc: str, flags: Sequence[Flag]) -> str:
    lines = [f"usage: {prog} --flag=value ...", "", doc.strip(), "", "flags:"]
    for f in flags:
        default = "" if f.default is None else f" (default {f.default})"
        lines.append(f"  --{f.name}{'' if f.type is bool else '=...'}  {f.help}{default}"
                     + ("  [required]" if f.required else ""))
    return "\n".join(lines)


def parse_flags(argv: Sequence[str], flags: Sequence[Flag], *, prog: str, doc: str = "",
                config: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """argv -> ({flag name: value}, [(override key, text)]); UsageError for anything unknown.

    `config=True` accepts `--config=FILE[:ARG]` and `--config.<key>=<value>` overrides."""
    by_name = {f.name: f for f in flags}
    values = {f.name: f.default for f in flags}
    overrides: list[tuple[str, str]] = []
    known = sorted(by_name) + (["config", "config.<key>"] if config else [])
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg in ("-h", "--help", "-help", "--helpshort", "--helpfull"):
            print(usage(prog, doc, flags))
            raise SystemExit(0)
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UsageError(f"unexpected argument {arg!r}: flags look like --name=value "
                             f"(known: {', '.join('--' + k for k in known)})")
        body = arg.lstrip("-")
        name, eq, text = body.partition("=")
        if config and (name == "config" or name.startswith("config.")):
            if not eq:
                if i >= len(args):
                    raise UsageError(f"--{name} needs a value: --{name}=...")
                text, i = args[i], i + 1
            if name == "config":
                values["config"] = text
            else:
                overrides.append((name[len("config."):], text))
            continue
        flag = by_name.get(name)
        negated = flag is None and name.startswith("no") and name[2:] in by_name and \
            by_name[name[2:]].type is bool
        if negated:
            flag = by_name[name[2:]]
        if flag is None:
            raise UsageError(f"unknown flag --{name}{_near(name, known)}; known flags: "
                             f"{', '.join('--' + k for k in known)}")
        if flag.type is bool and not eq:
            values[flag.name] = not negated
            continue
        if negated:
            raise UsageError(f"--{name} takes no value")
        if not eq:
            if i >= len(args):
                raise UsageError(f"--{name} needs a value: --{name}=...")
            text, i = args[i], i + 1
        values[flag.name] = _convert_flag(flag, text)
    for f in flags:
        if f.required and values[f.name] in (None, ""):
            raise UsageError(f"--{f.name} is required ({f.help})")
    if config and not values.get("config"):
        raise UsageError("--config is required: --config=experiments/<task>.py:<arg>")
    return values, overrides


# --------------------------------------------------------------------------- config files


def load_config(spec: str):
    """'path/to/file.py[:arg]' -> the file's `get_config(arg)` (ConfigError on any failure)."""
    path, _, arg = spec.partition(":")
    where = f"--config={spec}"
    if not path.endswith(".py"):
        raise UsageError(f"{where}: expected a Python file, e.g. experiments/lm.py:ttt_linear")
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no such file {path!r} (experiment files live in "
                         "experiments/: lm.py, vit.py, mqar.py, ablation.py)")
    name = "_ttt_config_" + os.path.splitext(os.path.basename(path))[0]
    try:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 — a broken file is a user's file
        raise ConfigError(f"{where}: the file does not load ({type(err).__name__}: "
                          f"{_first_line(err)})") from err
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"{where}: {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{where}: {_first_line(err)}") from err
    return config


def _first_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    text = text.strip()
    return text.splitlines()[0] if text else type(err).__name__


def _field_type(node, key: str):
    """The declared type of `node[key]`: a placeholder's type, else the value's type."""
    from ml_collections import config_dict

    ref = getattr(node, "_fields", {}).get(key)
    if isinstance(ref, config_dict.FieldReference):
        return ref.get_type()
    value = node[key]
    return None if value is None else type(value)


def parse_value(text: str, want, what: str):
    """Override text -> a value of type `want` (None: a Python literal, else the text)."""
    from ml_collections import config_dict

    if want is bool:
        return _parse_bool(text, what)
    if want in (int, float):
        try:
            return want(text)
        except ValueError:
            if want is float or text.strip().lower() not in ("none", "null"):
                raise UsageError(f"{what}={text}: expected {_type_name(want)}") from None
            return None
    if want is str:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if want in (tuple, list, dict, config_dict.ConfigDict):
            kind = want if want in (tuple, list) else dict
            raise UsageError(f"{what}={text}: expected {_type_name(kind)}") from None
        if text.strip().lower() in ("true", "false"):  # true / false: the booleans, not words
            return text.strip().lower() == "true"
        return text  # a bare word for a field without a type
    if want in (tuple, list):
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return want(value)
    if want in (dict, config_dict.ConfigDict) and not isinstance(value, dict):
        raise UsageError(f"{what}={text}: expected {_type_name(dict)}")
    return value


def apply_overrides(config, overrides: Sequence[tuple[str, str]]):
    """Set each `(dotted key, text)` on `config` in place; UsageError naming a bad key or value."""
    from ml_collections import config_dict

    for key, text in overrides:
        what = f"--config.{key}"
        parts = key.split(".")
        node, path = config, "config"
        for part in parts[:-1]:
            if isinstance(node, config_dict.ConfigDict) and part not in node and \
                    _free_form(path[len("config."):]):  # mixer_kwargs.swa.window=...: a new dict
                with node.unlocked():
                    node[part] = config_dict.ConfigDict()
            if not isinstance(node, config_dict.ConfigDict) or part not in node:
                raise UsageError(_unknown_key(what, path, part, node))
            node, path = node[part], f"{path}.{part}"
        leaf = parts[-1]
        if not isinstance(node, config_dict.ConfigDict):
            raise UsageError(f"{what}: {path} is {type(node).__name__}, not a section")
        section = path[len("config."):]
        free = _free_form(section) or leaf in ADDABLE.get(section, ())
        if leaf not in node:
            if not free:
                raise UsageError(_unknown_key(what, path, leaf, node))
            want = None
        else:
            want = _field_type(node, leaf)
            if isinstance(node[leaf], config_dict.ConfigDict) and \
                    not text.lstrip().startswith("{"):
                example = next(iter(node[leaf].keys()), "key")
                raise UsageError(f"{what}={text}: config.{key} is a section; set one of its "
                                 f"keys (--config.{key}.{example}=...) or give a dict")
        value = parse_value(text, want, what)
        try:
            with node.unlocked():
                node[leaf] = value
        except (TypeError, ValueError) as err:
            raise UsageError(f"{what}={text}: expected {_type_name(want)} ({_first_line(err)})"
                             ) from None
    return config


def _free_form(section: str) -> bool:
    """Whether `section` is free-form or inside one (model.mixer_kwargs.swa of a hybrid)."""
    return any(section == f or section.startswith(f + ".") for f in FREE_FORM)


def _unknown_key(what: str, path: str, key: str, node) -> str:
    from ml_collections import config_dict

    if not isinstance(node, config_dict.ConfigDict):
        return f"{what}: {path} is not a section"
    known = sorted(node.keys())
    return (f"{what}: {path} has no key {key!r}{_near(key, known)}; its keys: "
            f"{', '.join(known)}")


def changed_values(before, after) -> list[str]:
    """'key: old -> new' for every leaf of `after` that differs from `before` (dotted keys)."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(before.to_dict()), flat(after.to_dict())
    return [f"{k}: {repr(a[k]) if k in a else '(unset)'} -> {b[k]!r}" for k in b
            if k not in a or a[k] != b[k]]


# --------------------------------------------------------------------------- one error style


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test harnesses swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Format(logging.Formatter):
    def format(self, record):
        message = super().format(record)
        return message if record.levelno < logging.WARNING else \
            f"{record.levelname.lower()}: {message}"


@contextlib.contextmanager
def console():
    """While active, the package's log lines go to stderr undecorated ('warning: ...' for
    warnings) and orbax's INFO chatter is off; the logging setup is restored afterwards."""
    logger = logging.getLogger("ttt")
    handler = _Stderr()
    handler.setFormatter(_Format("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    absl_level = None
    try:
        from absl import logging as absl_logging

        absl_level = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if absl_level is not None:
            absl_logging.set_verbosity(absl_level)


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; a ConfigError becomes `error: ...` on stderr and exit status 2, and so
    does running out of memory (what to lower); Ctrl-C (where the command does not handle it
    itself) one line and exit status 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)
    try:
        with console():
            return int(main(argv) or 0)
    except SystemExit as done:  # --help
        return int(done.code or 0)
    except ConfigError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("\ninterrupted (SIGINT): stopped before finishing", file=sys.stderr)
        return 130
    except Exception as err:
        fault = out_of_memory_error(err, "running")
        if fault is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(fault)}", file=sys.stderr)
        return 2
