"""Your own learners and mixers on the command line: import the modules that register them.

A module that calls `ttt.ops.register_learner` or `ttt.layers.register_mixer` at import makes its
names usable everywhere a shipped name is. `python -m ttt.main --import=my_mixer.py` (or a module
name, `--import=my_pkg.mixers`; several comma-separated) imports them before the config is read
and records them in the run's config as `config.imports`, so that `ttt.sample`, `ttt.evaluate`,
`ttt.load_run` and `experiments.compare` import them again when they rebuild the model
(docs/extending.md).

Notable choices: a file is imported under a name derived from its absolute path, once per
process (importing it again would register its names twice); a path is kept as given (relative
to the directory the command runs in, like --workdir).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable

from ttt.errors import ConfigError


def parse(text: str | Iterable[str] | None) -> list[str]:
    """'a.py,pkg.mod' or a list of them -> ['a.py', 'pkg.mod'] (empty entries dropped)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    return [str(item).strip() for item in items if str(item).strip()]


def _module_name(path: str) -> str:
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"_ttt_extension_{stem}_{digest}"


def import_one(item: str):
    """Import a .py file or a module name (once per process); ConfigError in one line."""
    if item.endswith(".py"):
        if not os.path.isfile(item):
            raise ConfigError(f"import {item!r}: no such file (paths are relative to the "
                              "directory the command runs in)")
        name = _module_name(item)
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, item)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 — the user's file
            del sys.modules[name]
            raise ConfigError(f"import {item!r}: the file does not load "
                              f"({type(err).__name__}: {_first_line(err)})") from err
        return module
    try:
        return importlib.import_module(item)
    except Exception as err:  # noqa: BLE001 — the user's module
        raise ConfigError(f"import {item!r}: {type(err).__name__}: {_first_line(err)} (give a "
                          ".py file or a module on PYTHONPATH)") from err


def load(items: str | Iterable[str] | None) -> list[str]:
    """Import every module of `items` (see `parse`); returns the list imported."""
    items = parse(items)
    for item in items:
        import_one(item)
    return items


def load_from_config(config) -> list[str]:
    """Import the modules a run's config records (`config.imports`, absent in most runs)."""
    imports = config.get("imports") if hasattr(config, "get") else None
    return load(imports)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
