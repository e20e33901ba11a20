"""The layer cake holds: a static (AST) check of every import in `ttt/**/*.py` (docs/design.md §2).

Every `import` and `from … import` is read, including imports inside functions, relative imports
and `importlib.import_module("…")` / `__import__("…")` with a literal name; nothing is executed.
Levels, lowest first (the longest listed prefix of a module name decides its level):

    ops      ttt.ops        pure jax math             imports ttt.ops only, and no flax
    layers   ttt.layers     Flax mixers + registry    + ttt.ops
    models   ttt.models     CausalLM, ViT, presets    + ttt.layers
    interop  ttt.interop    official trees <-> ours   + ttt.models (nothing below imports it)
    data     ttt.data       input pipelines, beside   imports ttt.data only
    config   ttt.config     config validation         + ttt.data, ttt.interop (not ttt.train)
    files    ttt.files      atomic writes, checked reads  imports nothing of ttt
    train    ttt.train      steps, placement, driver  + ttt.config, ttt.files
    entry    ttt.<other>.py command lines (ttt.main)  anything in ttt

The package root `ttt/__init__.py` runs whenever any `ttt.*` module is imported, so at module level
it imports nothing of `ttt` (a function-level import there is an entry point's). Nothing under
`ttt/` imports `experiments` or `tests`. A new subpackage must be given a level in `LEVEL_OF`.
"""

from __future__ import annotations

import ast
import pathlib
from typing import NamedTuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ttt"

LEVEL_OF = {
    "ttt.ops": "ops",
    "ttt.layers": "layers",
    "ttt.models": "models",
    "ttt.interop": "interop",
    "ttt.data": "data",
    "ttt.config": "config",
    "ttt.cli": "cli",
    "ttt.errors": "errors",
    "ttt.files": "files",
    "ttt.train": "train",
}
_BELOW_TRAIN = {"ops", "layers", "models", "interop", "data", "config", "cli", "errors",
                "files"}
# level -> the levels it may import ("root", the package itself, is always allowed)
ALLOWED = {
    "root": set(),  # at module level; see the module docstring
    "ops": {"ops"},
    "layers": {"ops", "layers"},
    "models": {"ops", "layers", "models"},
    "interop": {"ops", "layers", "models", "interop"},
    "data": {"data", "errors"},
    "errors": set(),
    "files": set(),
    "cli": {"config", "errors"},
    "config": _BELOW_TRAIN - {"cli"},
    "train": _BELOW_TRAIN | {"train"},
    "entry": _BELOW_TRAIN | {"train", "entry"},
}
RULES = {
    "root": "ttt/__init__.py imports nothing of ttt at module level (every ttt.* import runs it)",
    "ops": "ttt/ops imports nothing of ttt outside ttt.ops",
    "layers": "ttt/layers imports only ttt.ops and ttt.layers (not models, train, data, config, "
              "interop, entry points)",
    "models": "ttt/models imports only ttt.ops, ttt.layers and ttt.models (not train, data, "
              "config, interop, entry points)",
    "interop": "ttt/interop imports only ttt.ops, ttt.layers, ttt.models and ttt.interop",
    "data": "ttt/data imports only ttt.data and ttt.errors (it sits beside the model stack)",
    "errors": "ttt/errors.py imports nothing of ttt (every level raises its ConfigError)",
    "files": "ttt/files.py (atomic writes, checked reads) imports nothing of ttt",
    "cli": "ttt/cli.py (command-line plumbing shared by the entry points and the trainer's "
           "console) imports only ttt.config and ttt.errors",
    "config": "ttt/config.py imports ops, layers, models, interop, data and errors, not ttt.cli, "
              "ttt.train or entry points (the trainer imports it)",
    "train": "ttt/train imports no entry point (ttt.main and other top-level command modules)",
    "entry": "",  # entry points may import anything in ttt
}
FORBIDDEN_PACKAGES = {"ops": ("flax",)}  # third-party packages a level must not import
FORBIDDEN_EVERYWHERE = ("experiments", "tests")


class Violation(NamedTuple):
    path: str  # relative to the repository root
    line: int
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.imported}: {self.rule}"


def module_name(path: pathlib.Path) -> tuple[str, bool]:
    """ttt/layers/common.py -> ("ttt.layers.common", False); ttt/ops/__init__.py -> ("ttt.ops",
    True)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def package_modules(root: pathlib.Path = PACKAGE) -> dict[str, bool]:
    """Every module of the package: name -> is_package."""
    return dict(module_name(p) for p in sorted(root.rglob("*.py")))


def level_of(module: str, modules: dict[str, bool]) -> str:
    """The level of a ttt module (see the module docstring); ValueError for an unlisted package."""
    if module == "ttt":
        return "root"
    for prefix in sorted(LEVEL_OF, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LEVEL_OF[prefix]
    top = ".".join(module.split(".")[:2])
    if modules.get(top, False):
        raise ValueError(f"{top} is a subpackage without a level: add it to LEVEL_OF")
    return "entry"  # a top-level module such as ttt.main


def _resolve_relative(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute package a relative `from` import names, or None if it climbs out of ttt."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    keep = len(base) - (node.level - 1)
    if keep < 1:
        return None
    return ".".join(base[:keep] + ([node.module] if node.module else []))


def _dynamic_name(node: ast.Call) -> str | None:
    """The literal module of importlib.import_module("x") / import_module("x") / __import__("x")."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def imports_of(source: str, module: str, is_package: bool, modules: dict[str, bool]):
    """Yield (line, imported module, at module level) for every import in `source`.

    `from pkg import name` names the submodule pkg.name when `modules` has it, else pkg itself.
    A relative import that climbs out of the package yields the module "<relative import beyond
    ttt>".
    """
    tree = ast.parse(source)
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(node, module, is_package)
                if base is None:
                    yield node.lineno, "<relative import beyond ttt>", top
                    continue
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in modules else base, top
        elif isinstance(node, ast.Call):
            name = _dynamic_name(node)
            if name is not None:
                yield node.lineno, name, top


def check_source(source: str, module: str, is_package: bool, modules: dict[str, bool],
                 path: str) -> list[Violation]:
    """Every import of one module's source that breaks the rules of its level."""
    try:
        level = level_of(module, modules)
    except ValueError as err:
        return [Violation(path, 1, module, str(err))]
    found = []
    for line, imported, top in imports_of(source, module, is_package, modules):
        root = imported.split(".")[0]
        if imported.startswith("<"):
            found.append(Violation(path, line, imported, "relative imports stay inside ttt"))
        elif root in FORBIDDEN_EVERYWHERE:
            found.append(Violation(path, line, imported,
                                   "nothing under ttt/ imports experiments or tests"))
        elif root in FORBIDDEN_PACKAGES.get(level, ()):
            found.append(Violation(path, line, imported, f"ttt/{level} does not import {root}"))
        elif root == "ttt" and imported != "ttt":
            if level == "root" and not top:
                continue  # a function-level import in the root is an entry point's
            try:
                target = level_of(imported, modules)
            except ValueError as err:
                found.append(Violation(path, line, imported, str(err)))
                continue
            if target not in ALLOWED[level] and level != "entry":
                found.append(Violation(path, line, imported, RULES[level]))
    return found


def check_package(root: pathlib.Path = PACKAGE) -> tuple[list[Violation], dict]:
    """Violations of every file under `root`, and per-level counts of ttt imports read."""
    modules = package_modules(root)
    violations, counts = [], {}
    for file in sorted(root.rglob("*.py")):
        module, is_package = module_name(file)
        source = file.read_text()
        rel = str(file.relative_to(REPO))
        found = check_source(source, module, is_package, modules, rel)
        violations += found
        if found and found[0].imported == module:
            continue  # the file's own subpackage has no level (reported)
        level = level_of(module, modules)
        n = sum(1 for _, name, _ in imports_of(source, module, is_package, modules)
                if name.split(".")[0] == "ttt")
        counts[level] = counts.get(level, 0) + n
    return violations, counts


def import_graph(sources: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
    """module -> the modules of `sources` it imports, at module level or inside functions.

    `sources`: module name -> (is_package, source). An import names the longest module of
    `sources` that prefixes it (`from pkg import sub` names pkg.sub when it is a module, else the
    package's __init__); a package's __init__ running before its submodules is not an edge."""
    modules = {name: is_package for name, (is_package, _) in sources.items()}
    graph = {}
    for module, (is_package, source) in sources.items():
        edges = set()
        for _, imported, _ in imports_of(source, module, is_package, modules):
            name = imported
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one module
    (Tarjan's algorithm), each sorted, then sorted by their first module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def package_sources(root: pathlib.Path = PACKAGE) -> dict[str, tuple[bool, str]]:
    """Every module of the package: name -> (is_package, source)."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        module, is_package = module_name(file)
        out[module] = (is_package, file.read_text())
    return out


def report(violations: list[Violation]) -> str:
    return f"{len(violations)} import(s) break the layer cake (docs/design.md §2):\n" + "\n".join(
        f"  {v}" for v in violations)


# ----------------------------------------------------------------------------- the real tree


def test_package_respects_the_layer_cake():
    violations, _ = check_package()
    assert not violations, report(violations)


def test_no_import_cycle_between_files():
    """No file of the package imports itself back through others, counting the imports inside
    functions (a function-level import that closes a cycle is a cycle in disguise)."""
    graph = import_graph(package_sources())
    cycles = import_cycles(graph)
    assert not cycles, "import cycles among the package's files:\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)
    assert sum(len(e) for e in graph.values()) > 100, "the graph is suspiciously small"


def test_every_level_is_scanned():
    """The check is not vacuous: every level has files whose ttt imports were read."""
    _, counts = check_package()
    for level in ("ops", "layers", "models", "interop", "data", "config", "train", "entry"):
        assert counts.get(level, 0) > 0, f"no ttt imports read at level {level}: {counts}"
    assert sum(counts.values()) > 50, counts


# ----------------------------------------------------------------------------- the checker itself

MODULES = package_modules()

BAD = [  # (module, is_package, source, the one imported module that must be reported, line)
    ("ttt.ops.fake", False, "import jax\nimport flax.linen as nn\n", "flax.linen", 2),
    ("ttt.ops.fake", False, "from ..layers import common\n", "ttt.layers.common", 1),
    ("ttt.ops.fake", False, "from ttt import models\n", "ttt.models", 1),
    ("ttt.ops.fake", False, "import importlib\nm = importlib.import_module('ttt.layers')\n",
     "ttt.layers", 2),
    ("ttt.layers.fake", False,
     "import jax\n\ndef f():\n    from ttt.train.parallel import mesh_shape\n",
     "ttt.train.parallel", 4),
    ("ttt.layers", True, "from . import common\nfrom .. import data\n", "ttt.data", 2),
    ("ttt.models.fake", False, "import ttt.data.pipeline\n", "ttt.data.pipeline", 1),
    ("ttt.models.fake", False, "from ..train import steps\n", "ttt.train.steps", 1),
    ("ttt.models.fake", False, "from ... import x\n", "<relative import beyond ttt>", 1),
    ("ttt.data.fake", False, "from ttt.layers import make_mixer\n", "ttt.layers", 1),
    ("ttt.config", False, "def f():\n    from ttt.train.parallel import mesh_shape\n",
     "ttt.train.parallel", 2),
    ("ttt.train.fake", False, "from ttt import main\n", "ttt.main", 1),
    ("ttt.train.fake", False, "import experiments.lm\n", "experiments.lm", 1),
    ("ttt.main", False, "from tests import toy\n", "tests", 1),
    ("ttt", True, "from ttt.train import train_and_evaluate\n", "ttt.train", 1),
]


@pytest.mark.parametrize("module, is_package, source, imported, line", BAD,
                         ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_checker_reports_a_violation(module, is_package, source, imported, line):
    found = check_source(source, module, is_package, MODULES, "x.py")
    assert [(v.imported, v.line) for v in found] == [(imported, line)], found
    assert str(found[0]).startswith(f"x.py:{line}: imports {imported}: ")


GOOD = [  # legal imports at each level: nothing may be reported
    ("ttt.ops.fake", False, "import jax\nimport numpy as np\nfrom . import checks\n"
     "from ._scan import to_minibatches\nfrom ttt.ops import learners\nimport ttt\n"),
    ("ttt.layers.fake", False, "import flax.linen as nn\nfrom ttt.ops import ttt\n"
     "from . import common\nfrom ..ops import linear_attn\n"),
    ("ttt.models.fake", False, "from ttt import layers\nfrom .stack import make_stack\n"),
    ("ttt.interop", False, "from ttt import layers\nfrom ttt.models import build_model\n"),
    ("ttt.data.fake", False, "import grain\nfrom ttt.data.errors import DataConfigError\n"),
    ("ttt.config", False, "from ttt.layers import make_mixer\nfrom ttt.models import PRESETS\n"),
    ("ttt.train.fake", False, "from ttt.config import validate\nfrom ttt.data import make_dataset\n"
     "from ttt.models import build_model\nfrom . import parallel\n"),
    ("ttt.main", False, "from ttt.train import train_and_evaluate\nfrom ttt.config import "
     "ConfigError\n"),
    ("ttt", True, "__version__ = '0'\n\ndef __getattr__(name):\n    from ttt import train\n"),
]


@pytest.mark.parametrize("module, is_package, source", GOOD, ids=[g[0] for g in GOOD])
def test_checker_accepts_legal_imports(module, is_package, source):
    assert check_source(source, module, is_package, MODULES, "x.py") == []


def test_one_message_lists_every_violation():
    source = "import flax\n\ndef f():\n    from ttt.layers import common\n    import experiments\n"
    found = check_source(source, "ttt.ops.fake", False, MODULES, "ttt/ops/fake.py")
    message = report(found)
    for expected in ("3 import(s)", "ttt/ops/fake.py:1: imports flax:",
                     "ttt/ops/fake.py:4: imports ttt.layers.common:",
                     "ttt/ops/fake.py:5: imports experiments:"):
        assert expected in message, message


def test_an_unlisted_subpackage_must_be_given_a_level():
    modules = dict(MODULES, **{"ttt.kernels": True, "ttt.kernels.fast": False})
    found = check_source("from ttt.kernels import fast\n", "ttt.ops.fake", False, modules, "x.py")
    assert len(found) == 1 and "add it to LEVEL_OF" in found[0].rule, found


CYCLE = {  # a cycle closed by a function-level import, through a package's __init__
    "ttt.train": (True, "from ttt.train.driver import run\n"),
    "ttt.train.driver": (False, "from ttt.train import loader\n"),
    "ttt.train.loader": (False, "def load():\n    from ttt.train.report import make\n"),
    "ttt.train.report": (False, "import jax\nfrom ttt.train.driver import setup\n"),
    "ttt.train.leaf": (False, "from ttt.train import driver\n"),
}


def test_cycle_check_finds_a_cycle_through_a_function_level_import():
    graph = import_graph(CYCLE)
    assert graph["ttt.train.driver"] == {"ttt.train.loader"}  # a submodule, not the __init__
    assert import_cycles(graph) == [["ttt.train.driver", "ttt.train.loader", "ttt.train.report"]]
    broken = dict(CYCLE, **{"ttt.train.loader": (False, "def load():\n    return 1\n")})
    assert import_cycles(import_graph(broken)) == []
    assert import_cycles({"a": {"b"}, "b": {"a"}, "c": {"c"}}) == [["a", "b"]]
