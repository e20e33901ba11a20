"""The docs cannot drift from the code.

Every command written in README.md and docs/*.md (a line of a code block, fenced or indented, or
an inline code span, that starts with `python -m ttt.<module>`, `python -m experiments.<module>`,
`python3 -m <module>`, `python experiments/<file>.py` or `make <target>`, after an optional `$ `,
environment assignments and `.venv/bin/`; also the command after a code line's `# = `, as in
`make demo  # = python -m experiments.compare ...`, where the Makefile's recipe of that target
must then run the same command) is checked without running anything heavy:

  make T                     T is a target of the Makefile
  python -m ttt.main ...     every flag is a flag of ttt.main (`ttt.cli.parse_flags`), the
                             --config file loads with its tokens (`ttt.cli.load_config`, the CLI's
                             loader), every --config.a.b=value override names an existing key and
                             its value parses as that field's type (`ttt.cli.apply_overrides`),
                             and the result passes `ttt.config.validate` (less config.init, whose
                             paths name earlier runs)
  python -m ttt.sample / ttt.evaluate: every flag is defined (their `FLAGS`, `ttt.cli`)
  python -m experiments.M    the module exists and its arguments parse: its `main` runs with
                             argparse's parse_args stopped right after parsing; config specs among
                             the arguments (and a --preset's cells, with --set overrides) load
  python3 -m M (others)      the module can be imported (venv, pip, pytest)

A command with a placeholder (`<name>`, `…`, `...`) or usage brackets (`[--flag]`) fails: the docs
give concrete commands. An inline span naming a program without arguments is a reference to it
(only the module is checked); inline spans need not repeat required flags. A command in a code
block followed by a line `error: <message>` (a transcript of the CLI refusing it) passes if the
check refuses it with that message, and fails if the check accepts it. Also: README.md is at
most README_MAX_LINES lines, every relative link of the docs resolves to a file, the bench tables
of docs/benchmarks.md are what `experiments.bench_report` writes from docs/bench/bench.json, and
negative controls show that each kind of mistake is caught.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import pathlib
import re
import shlex
import sys

import pytest

from experiments import bench, bench_report
from experiments.specs import load_config
from ttt import budget, cli, extensions
from ttt.config import ConfigError, validate, with_defaults

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
MIN_COMMANDS = 40  # a lower bound (63 found on 2026-12-06), so that a broken extractor fails
BENCH_JSON = ROOT / "docs" / "bench" / "bench.json"
BENCH_DOC = ROOT / "docs" / "benchmarks.md"


# ------------------------------------------------------------------------------- extraction


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # "README.md:74", the line the command starts on
    text: str  # as written, continuation lines joined
    block: bool  # from a code block, fenced or indented (else an inline code span)
    error: str | None = None  # a transcript's `error: ...` line right below the command
    make_target: str | None = None  # `make T  # = <this command>`: what T is said to run


_ENV = r"""[A-Za-z_][A-Za-z0-9_]*=(?:"[^"]*"|'[^']*'|[^\s"']*)+\s+"""
COMMAND_START = re.compile(
    rf"^(?:\$\s+)?(?:{_ENV})*(?:\.venv/bin/)?"
    r"(?:python3?\s+-m\s+[A-Za-z_]|python3?\s+experiments/\S+\.py|make\s+[A-Za-z_-])")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


def line_kinds(lines: list[str]) -> list[str]:
    """Each line's kind: "fence" (a fence line), "code" (in a fenced or indented code block),
    "blank", "comment" (an HTML comment line) or "prose"."""
    kinds, fence = [], None
    for line in lines:
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
            kinds.append("fence")
        elif fence is not None:
            closing = m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and \
                not line.strip()[len(m.group(1)):].strip()
            fence = None if closing else fence
            kinds.append("fence" if closing else "code")
        elif not line.strip():
            kinds.append("blank")
        elif re.match(r"^(?: {4}|\t)", line) and (kinds[-1:] in ([], ["blank"], ["code"])
                                                  or (kinds[-1] == "fence")):
            kinds.append("code")  # an indented code block (it cannot interrupt a paragraph)
        elif line.lstrip().startswith("<!--"):
            kinds.append("comment")
        else:
            kinds.append("prose")
    return kinds


def extract_commands(text: str, name: str) -> list[Command]:
    """The commands of one markdown text (see the module doc), in order."""
    out: list[Command] = []
    lines = text.splitlines()
    kinds = line_kinds(lines)
    i = 0
    while i < len(lines):
        number = i + 1
        if kinds[i] == "prose":  # a paragraph: its inline code spans
            j = i
            while j < len(lines) and kinds[j] == "prose":
                j += 1
            body = "\n".join(lines[i:j])
            for m in CODE_SPAN.finditer(body):
                code = " ".join(re.sub(r"\\\s*\n\s*", " ", m.group(2)).split())
                if COMMAND_START.match(code):
                    line = number + body.count("\n", 0, m.start())
                    out.append(Command(f"{name}:{line}", code, block=False))
            i = j
            continue
        if kinds[i] != "code":
            i += 1
            continue
        logical = lines[i]  # the line with its backslash-continued lines joined
        i += 1
        while logical.rstrip().endswith("\\") and i < len(lines) and kinds[i] == "code":
            logical = logical.rstrip()[:-1].rstrip() + " " + lines[i].strip()
            i += 1
        logical = logical.strip()
        if COMMAND_START.match(logical):
            error = None  # a transcript that shows the command failing, as documented
            if i < len(lines) and kinds[i] == "code" and lines[i].strip().startswith("error: "):
                error = lines[i].strip().removeprefix("error: ")
            out.append(Command(f"{name}:{number}", logical, block=True, error=error))
            same = re.search(r"(?:^|\s)#\s*=\s*(.+)$", logical)  # `make demo  # = python -m ...`
            if same and COMMAND_START.match(same.group(1).strip()):
                target = re.match(r"^(?:\$\s+)?make\s+([\w.-]+)\s+#", logical)
                out.append(Command(f"{name}:{number}", same.group(1).strip(), block=True,
                                   make_target=target.group(1) if target else None))
    return out


def doc_commands() -> list[Command]:
    out = []
    for path in DOCS:
        out += extract_commands(path.read_text(), str(path.relative_to(ROOT)))
    return out


# --------------------------------------------------------------------------------- checking


class CommandError(Exception):
    """What is wrong with a documented command (one message)."""


PLACEHOLDER = re.compile(r"<[A-Za-z_][^<>]*>|…|(?:^|\s)\.\.\.(?:\s|$)")
USAGE_BRACKETS = re.compile(r"(?:^|\s)\[-")
OPERATORS = {"|", "||", "&&", ";", "&"}


def _strip_comment(text: str) -> str:
    """Cut a shell comment: `#` at the start of a word, outside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text


def split_command(text: str) -> list[str]:
    """The words of the command itself: comments, redirections, pipes and anything chained after
    it cut; a leading `$ `, environment assignments and `.venv/bin/` dropped."""
    try:
        words = shlex.split(_strip_comment(text))
    except ValueError as err:
        raise CommandError(f"does not parse as a shell command ({err})") from None
    for i, word in enumerate(words):
        if word in OPERATORS or re.match(r"^\d*[<>]", word):
            words = words[:i]
            break
    if words[:1] == ["$"]:
        words = words[1:]
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    if words:
        words[0] = words[0].removeprefix(".venv/bin/")
    return words


@contextlib.contextmanager
def _in_root():
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(old)


def make_targets(makefile: pathlib.Path = ROOT / "Makefile") -> set[str]:
    targets = set()
    for line in makefile.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.%/ -]+?)\s*::?(?!=)", line)
        if m and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if not t.startswith("."))
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
    return targets


def make_recipes(makefile: pathlib.Path = ROOT / "Makefile") -> dict[str, list[str]]:
    """target -> its recipe lines, continuation lines joined and $(VARIABLES) expanded."""
    text = re.sub(r"\\\n\s*", " ", makefile.read_text())
    variables, recipes, current = {}, {}, None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            recipes.setdefault(current, []).append(line.strip())
            continue
        assign = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:]?=\s*(.*)$", line)
        rule = re.match(r"^([A-Za-z0-9_.%/-]+)\s*:(?!=)", line)
        if assign:
            variables[assign.group(1)] = assign.group(2).strip()
        current = rule.group(1) if rule and not assign else None

    def expand(value: str, depth: int = 0) -> str:
        if depth > 10:
            return value
        return re.sub(r"\$\((\w+)\)", lambda m: expand(variables.get(m.group(1), ""), depth + 1),
                      value)

    return {target: [expand(line) for line in lines] for target, lines in recipes.items()}


def check_same_as_make(target: str, words: list[str]) -> None:
    """`make T  # = <command>`: the Makefile's recipe of T runs that command."""
    recipes = make_recipes().get(target, [])
    runs = [split_command(line) for line in recipes]
    if words not in runs:
        shown = "; ".join(" ".join(r) for r in runs) or "nothing"
        raise CommandError(f"the doc says `make {target}` runs this, but the Makefile's "
                           f"{target} runs: {shown}")


def check_make(args: list[str]) -> None:
    known = make_targets()
    goals = [a for a in args if not a.startswith("-") and "=" not in a]
    for goal in goals:
        if goal not in known:
            raise CommandError(f"make: no target {goal!r} in the Makefile (targets: "
                               f"{', '.join(sorted(known))})")


def check_ttt(module_name: str, args: list[str], block: bool) -> None:
    """A ttt command line (`ttt.cli` flags; ttt.main also its config and overrides)."""
    module = importlib.import_module(module_name)
    flags = getattr(module, "FLAGS", None)
    if flags is None:
        raise CommandError(f"{module_name} has no command line (no FLAGS)")
    is_main = module_name == "ttt.main"
    if is_main and any(a == "--list" or a.startswith("--list=") for a in args):
        from ttt.catalogue import SECTIONS  # the catalogue: no config, no other flag needed

        sections = [a.partition("=")[2] for a in args if a.startswith("--list=")]
        if any(s not in SECTIONS for s in sections):
            raise CommandError(f"--list={sections[0]}: not one of {', '.join(SECTIONS)}")
        return
    has_config = any(a == "--config" or a.startswith("--config=") for a in args)
    if not block:  # an inline mention of some flags need not repeat the required ones
        flags = [dataclasses.replace(f, required=False) for f in flags]
        if is_main and not has_config:
            args = [*args, "--config=(none)"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            values, overrides = cli.parse_flags(args, flags, prog=f"python -m {module_name}",
                                                config=is_main)
    except SystemExit:  # --help
        return
    except cli.UsageError as err:
        raise CommandError(cli.one_line(err)) from None
    if not is_main or not has_config:
        return
    if block and not values["compile_only"] and not values["workdir"]:
        raise CommandError("--workdir is required (or --compile_only)")
    if values.get("import"):  # the command's own learners / mixers, as ttt.main imports them
        with _in_root():
            try:
                extensions.load(values["import"])
            except ConfigError as err:
                raise CommandError(cli.one_line(err)) from None
    check_config(values["config"], overrides, num_devices=values["simulate_devices"] or None,
                 process_count=values["num_processes"])


def check_config(spec: str, overrides, *, num_devices=None, process_count=1) -> None:
    """Load `spec` with the CLI's loader, apply `overrides` [(key, text)], validate."""
    with _in_root():
        try:
            defaults = with_defaults(cli.load_config(spec))
            config = cli.apply_overrides(with_defaults(defaults), overrides)
            budget.follow_steps(config, defaults.train.get("steps"), [k for k, _ in overrides])
        except ConfigError as err:
            raise CommandError(cli.one_line(err)) from None
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.init = {}  # its paths name the runs of earlier commands
    try:
        validate(config, num_devices=num_devices or _devices_for(config),
                 process_count=process_count)
    except ConfigError as err:
        raise CommandError(cli.one_line(err)) from None


def _devices_for(config) -> int:
    """A device count the config's placement fits (a mesh's fixed sizes; else 1)."""
    train = config.train
    if train.get("parallel") != "mesh":
        return 1
    n = 1
    for axis in ("data", "fsdp", "model"):
        n *= max(int(train.mesh.get(axis, 1)), 1)
    return n


def _load_experiment_config(spec: str, overrides=()):
    return load_config(spec, overrides)


class _Parsed(BaseException):  # noqa: N818 — a sentinel, not an error
    """Raised right after argparse has parsed a command line: nothing after it runs (a
    BaseException, so that no `except Exception` of the module's main swallows it)."""

    def __init__(self, parser, namespace):
        super().__init__("parsed")
        self.parser, self.namespace = parser, namespace


@contextlib.contextmanager
def _stop_after_parsing():
    original_args = argparse.ArgumentParser.parse_args
    original_known = argparse.ArgumentParser.parse_known_args
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(True)
        try:
            parsed = original_args(self, args, namespace)
        finally:
            inside.pop()
        raise _Parsed(self, parsed)

    def parse_known_args(self, args=None, namespace=None):
        parsed = original_known(self, args, namespace)
        if not inside:
            raise _Parsed(self, parsed[0])
        return parsed

    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original_args
        argparse.ArgumentParser.parse_known_args = original_known


SPEC = re.compile(r"^[\w./-]+\.py:\S*$")


def parse_experiment(module, args: list[str], block: bool, script: str):
    """Run `module.main` until argparse has parsed `args`; the namespace (None for --help)."""
    main = getattr(module, "main", None)
    source = inspect.getsource(module)
    if main is None or "argparse" not in source:
        raise CommandError(f"{module.__name__} has no argparse command line (main) to check")
    takes_argv = bool(inspect.signature(main).parameters)
    stderr, saved_argv = io.StringIO(), sys.argv
    try:
        with _stop_after_parsing(), contextlib.redirect_stderr(stderr), \
                contextlib.redirect_stdout(io.StringIO()), _in_root():
            if not takes_argv:
                sys.argv = [script, *args]
            main(args) if takes_argv else main()
    except _Parsed as done:
        return done.namespace
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None  # --help
        message = " ".join(stderr.getvalue().split()) or f"exit status {exit_.code}"
        if not block and "the following arguments are required" in message:
            return None
        raise CommandError(message) from None
    finally:
        sys.argv = saved_argv
    raise CommandError(f"{module.__name__}.main returned without parsing its arguments")


def check_experiment(module_name: str, args: list[str], block: bool) -> None:
    path = ROOT / (module_name.replace(".", "/") + ".py")
    if not path.is_file():
        raise CommandError(f"no module {module_name} ({path.relative_to(ROOT)} does not exist)")
    if not args and not block:
        return  # a mention of the program
    module = importlib.import_module(module_name)
    namespace = parse_experiment(module, args, block, str(path.relative_to(ROOT)))
    if namespace is None:
        return
    overrides = list(getattr(namespace, "overrides", None) or [])
    specs = []
    for value in vars(namespace).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and SPEC.match(item):
                specs.append((item, overrides))
    presets = getattr(module, "PRESETS", None)
    preset = getattr(namespace, "preset", None)
    if isinstance(presets, dict) and preset in presets:
        groups = set(namespace.only.split(",")) if getattr(namespace, "only", None) else None
        for cell in presets[preset]:
            if groups is None or getattr(cell, "group", None) in groups:
                specs.append((cell.spec, [*getattr(cell, "overrides", ()), *overrides]))
    with _in_root():
        for spec, extra in dict.fromkeys((s, tuple(o)) for s, o in specs):
            try:
                _load_experiment_config(spec, extra)
            except ConfigError as err:
                raise CommandError(cli.one_line(err)) from None


def check_command(text: str, block: bool = True) -> None:
    """Raise CommandError saying what is wrong with one documented command."""
    if PLACEHOLDER.search(text):
        raise CommandError("a placeholder (<...>, …, ...): write a concrete command that runs")
    if USAGE_BRACKETS.search(text):
        raise CommandError("usage brackets ([--flag ...]): write a concrete command that runs")
    words = split_command(text)
    if not words:
        raise CommandError("no command left after the prefixes")
    program, args = words[0], words[1:]
    if program == "make":
        return check_make(args)
    if program not in ("python", "python3"):
        raise CommandError(f"not a python or make command: {program}")
    if args[:1] == ["-m"] and len(args) > 1:
        module_name, rest = args[1], args[2:]
        if module_name.startswith("ttt."):
            if importlib.util.find_spec(module_name) is None:
                raise CommandError(f"no module {module_name}")
            if not rest and not block:
                return
            return check_ttt(module_name, rest, block)
        if module_name.startswith("experiments."):
            return check_experiment(module_name, rest, block)
        if importlib.util.find_spec(module_name) is None:
            raise CommandError(f"no module {module_name} in this environment")
        return None
    if args and args[0].startswith("experiments/") and args[0].endswith(".py"):
        module_name = args[0][:-3].replace("/", ".")
        return check_experiment(module_name, args[1:], block)
    raise CommandError(f"not a `python -m <module>` command: {' '.join(words)}")


def problem(command: Command) -> str | None:
    """None if the command checks out (or fails as its transcript shows), else why not."""
    try:
        check_command(command.text, command.block)
        if command.make_target:
            check_same_as_make(command.make_target, split_command(command.text))
    except CommandError as err:
        if command.error is None or command.error not in str(err):
            return str(err) if command.error is None else (
                f"documented to fail with `error: {command.error}`, but: {err}")
        return None
    if command.error is not None:
        return f"documented to fail with `error: {command.error}`, but it checks out"
    return None


COMMANDS = doc_commands()


def _ids(commands: list[Command]) -> list[str]:
    """file:line, with #2, #3 ... for further commands on the same line."""
    seen: dict[str, int] = {}
    out = []
    for c in commands:
        seen[c.where] = seen.get(c.where, 0) + 1
        out.append(c.where if seen[c.where] == 1 else f"{c.where}#{seen[c.where]}")
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command(command):
    reason = problem(command)
    if reason is not None:
        pytest.fail(f"{command.where}: {command.text}\n    {reason}", pytrace=False)


def test_the_docs_hold_commands(capsys):
    with capsys.disabled():
        print(f"\n{len(COMMANDS)} documented commands ("
              f"{sum(c.block for c in COMMANDS)} in code blocks) in "
              f"{', '.join(str(p.relative_to(ROOT)) for p in DOCS)}")
    assert len(COMMANDS) >= MIN_COMMANDS, [c.where for c in COMMANDS]


# ------------------------------------------------------------------------- negative controls

SNIPPET = """\
Some prose with `python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a`
and a bare mention of `python -m ttt.main` and `make test`.
Inline flags alone: `python -m ttt.main --compile_only`, `python -m ttt.sample --top_k=3`,
`python -m ttt.main --nosuch`.

```bash
$ JAX_PLATFORMS=cpu .venv/bin/python -m ttt.main \\
    --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a \\
    --config.train.steps=5 2>&1 | tee log   # a comment
python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a --no_such_flag=1
python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a \\
    --config.train.no_such_key=3
python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a \\
    --config.train.steps=many
make no_such_target   # = python -m experiments.bench --out runs/bench --no-such-flag
python -m ttt.main --config=experiments/no_such_file.py:ttt_linear --workdir=/tmp/a
python -m ttt.main --config=experiments/lm.py:ttt_linear,smok --workdir=/tmp/a
python -m ttt.main --config=experiments/lm.py:<mixer>,smoke --workdir=/tmp/a
python -m ttt.sample --workdir=/tmp/a --prompt="x" --no_such_flag=2
python -m experiments.bench --out /tmp/b --no-such-flag
python -m experiments.compare --workdir /tmp/c --configs experiments/lm.py:ttt_linear,smok
python -m experiments.compare --workdir /tmp/c --configs experiments/lm.py:ttt_linear,smoke \\
    --set train.no_such_key=1
python -m experiments.no_such_module --x
python -m experiments.bench --out /tmp/b [--quick]
make demo   # = python -m experiments.compare --preset demo --workdir /tmp/c
python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --config.optim.warmup_steps=9999 \\
    --workdir=/tmp/a
```

```
$ python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a --nosuch
error: unknown flag --nosuch; known flags: --compile_only
$ python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a
error: something it does not say
$ python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a --nosuch
error: another message
```
"""


def test_the_checker_catches_each_kind_of_mistake():
    commands = extract_commands(SNIPPET, "snippet.md")
    assert [c.where for c in commands] == [
        "snippet.md:1", "snippet.md:2", "snippet.md:2", "snippet.md:3", "snippet.md:3",
        "snippet.md:4", *(f"snippet.md:{n}" for n in (
            7, 10, 11, 13, 15, 15, 16, 17, 18, 19, 20, 21, 22, 24, 25, 26, 26, 27, 32, 34, 36))]
    by_id = dict(zip(_ids(commands), commands, strict=True))
    assert [c.block for c in commands[:7]] == [False] * 6 + [True]
    assert by_id["snippet.md:7"].text == (
        "$ JAX_PLATFORMS=cpu .venv/bin/python -m ttt.main "
        "--config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/a "
        "--config.train.steps=5 2>&1 | tee log   # a comment")
    expected = {
        # good: an inline command, bare mentions, a continued line with env, comment and pipe,
        # and a preset's cells (each cell's config loads)
        "snippet.md:1": None, "snippet.md:2": None, "snippet.md:2#2": None,
        "snippet.md:3": None, "snippet.md:3#2": None, "snippet.md:4": r"unknown flag --nosuch",
        "snippet.md:7": None, "snippet.md:26": None,
        "snippet.md:26#2": r"the doc says `make demo` runs this, but the Makefile's demo runs: "
                           r"python -m experiments\.compare --preset demo --workdir runs/demo",
        "snippet.md:10": r"unknown flag --no_such_flag",
        "snippet.md:11": r"config\.train has no key 'no_such_key'",
        "snippet.md:13": r"--config\.train\.steps=many: expected an integer",
        "snippet.md:15": r"make: no target 'no_such_target'",
        "snippet.md:15#2": r"unrecognized arguments: --no-such-flag",  # after `# = `
        "snippet.md:16": r"no such file 'experiments/no_such_file\.py'",
        "snippet.md:17": r"smok",
        "snippet.md:18": r"placeholder",
        "snippet.md:19": r"unknown flag --no_such_flag",
        "snippet.md:20": r"unrecognized arguments: --no-such-flag",
        "snippet.md:21": r"smok",
        "snippet.md:22": r"train has no key 'no_such_key'",
        "snippet.md:24": r"no module experiments\.no_such_module",
        "snippet.md:25": r"usage brackets",
        "snippet.md:27": r"config\.optim\.warmup_steps=9999: must lie in",  # validate()
        # transcripts: the documented refusal; a refusal that does not happen; another one
        "snippet.md:32": None,
        "snippet.md:34": r"documented to fail with `error: something it does not say`, but it "
                         r"checks out",
        "snippet.md:36": r"documented to fail with `error: another message`, but: unknown flag",
    }
    wrong = {}
    for where, pattern in expected.items():
        reason = problem(by_id[where])
        if (reason is not None) if pattern is None else \
                (reason is None or not re.search(pattern, reason)):
            wrong[where] = f"expected {pattern or 'no problem'}, got {reason!r}"
    assert not wrong, wrong


def test_split_command_cuts_what_is_not_the_command():
    assert split_command('$ A=1 B="x y" .venv/bin/python -m ttt.main --a=b#c # note 2>&1') == [
        "python", "-m", "ttt.main", "--a=b#c"]
    assert split_command("python -m x --y 1 > out.txt 2>&1") == ["python", "-m", "x", "--y", "1"]
    assert split_command("make test | tail -3") == ["make", "test"]
    assert "test" in make_targets() and "install" in make_targets()


# ------------------------------------------------------------------------- the docs as files


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, (f"README.md has {n} lines, more than {README_MAX_LINES}: "
                                   "move detail to docs/")


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every relative link outside code (anchors and URLs left out)."""
    out = []
    lines = text.splitlines()
    for number, (line, kind) in enumerate(zip(lines, line_kinds(lines), strict=True), 1):
        if kind != "prose":
            continue
        prose = CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in LINK.finditer(prose)]
        ref = REF_LINK.match(prose)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
                continue
            out.append((number, target))
    return out


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for number, target in relative_links(doc.read_text()):
            path = target.split("#", 1)[0].split("?", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


# ---------------------------------------------------------------------- generated bench tables


@pytest.mark.parametrize("doc, begin, json_path", [
    ("docs/benchmarks.md", "BEGIN", BENCH_JSON),
    ("README.md", "SUMMARY_BEGIN", BENCH_JSON),
    ("docs/benchmarks_family.md", "BEGIN", ROOT / "docs" / "bench" / "family" / "bench.json")])
def test_bench_figures_in_the_docs_are_generated_from_the_bench_json(doc, begin, json_path):
    """docs/benchmarks.md's tables and the README's short speed table are what
    `experiments.bench_report` writes from docs/bench/bench.json; the delta-rule family's tables
    what it writes from that run's docs/bench/family/bench.json."""
    text = (ROOT / doc).read_text()
    mark = getattr(bench_report, begin)
    assert any(line.startswith(mark) for line in text.splitlines()), f"{doc}: no {mark!r} line"
    rel = json_path.relative_to(ROOT)
    if not json_path.exists():
        pytest.skip(f"{rel} is not in the repository yet (it comes from a bench run); nothing to "
                    "compare the docs against")
    with _in_root():
        old, new = bench_report.rewrite(str(rel), doc)
    assert old == new, (
        f"{doc}'s bench figures differ from {rel}: run python -m "
        f"experiments.bench_report {rel} --into {doc}")


@pytest.fixture(scope="module")
def tiny_bench_json(tmp_path_factory):
    """bench.json of the smallest run of experiments.bench (its smoke path, one mixer; the
    matmul ceiling, seconds of large matmuls, replaced by a fixed figure)."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "matmul_ceiling", lambda runs: {"square_64": 1.0,
                                                            "ceiling_gflops": 1.0})
        bench.main(["--out", str(out), "--width", "32", "--heads", "2", "--ns", "32",
                    "--runs", "1", "--mixers", "linattn_chunked",
                    "--skip", "batch,decode,remat,lm_compile,small"])
    return out / "bench.json"


def test_bench_report_writes_and_checks_the_docs_block(tiny_bench_json, tmp_path, capsys):
    result = json.loads(tiny_bench_json.read_text())
    assert result["machine"]["cpu"] and result["command"].startswith("python -m experiments.bench")
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    (tmp_path / "docs" / "bench").mkdir()
    data = tmp_path / "docs" / "bench" / "bench.json"
    data.write_text(tiny_bench_json.read_text())
    head = ("# Benchmarks\n\nProse before.\n\n<!-- bench tables: generated by python -m "
            "experiments.bench_report docs/bench/bench.json --into docs/benchmarks.md -->\n")
    tail = "<!-- end of bench tables -->\n\nProse after.\n"
    doc.write_text(head + "| old | table |\n" + tail)
    argv = [str(data), "--into", str(doc)]

    assert bench_report.main([*argv, "--check"]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "differ" in message and "--into" in message
    assert doc.read_text() == head + "| old | table |\n" + tail  # --check writes nothing

    assert bench_report.main(argv) == 0
    text = doc.read_text()
    assert text.startswith(head) and text.endswith(tail)
    block = text[len(head):-len(tail)]
    first, blank, rest = block.split("\n", 2)
    assert blank == "" and rest == bench_report.markdown(result)
    assert first.startswith("Generated from [bench/bench.json](bench/bench.json), the run of "
                            f"{result['date']} (`{result['command']}`) on "
                            f"{result['machine']['cpu']}, {result['machine']['cpu_count']} CPUs")
    assert bench_report.main([*argv, "--check"]) == 0
    assert bench_report.main(argv) == 0 and doc.read_text() == text  # idempotent

    doc.write_text(text.replace("| linattn_chunked | 32 |", "| linattn_chunked | 33 |"))
    assert bench_report.main([*argv, "--check"]) == 1  # a hand edit is caught
    doc.write_text(head + "no end marker\n")
    capsys.readouterr()
    assert bench_report.main([*argv, "--check"]) == 2
    assert "end of bench tables" in capsys.readouterr().err


def test_bench_report_writes_the_readme_summary(tiny_bench_json, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_report, "SUMMARY_NS", (32, 2048))
    monkeypatch.setattr(bench_report, "SUMMARY_RATIO_NS", (32,))
    result = json.loads(tiny_bench_json.read_text())
    result["decode"] = [{"mixer": "linattn_chunked", "context": 1024, "step_s": 0.5e-3}]
    data = tmp_path / "bench.json"
    data.write_text(json.dumps(result))
    head = ("# Speed\n\n<!-- bench summary: generated by python -m experiments.bench_report "
            "bench.json --into README.md -->\n")
    tail = "<!-- end of bench summary -->\n"
    doc = tmp_path / "README.md"
    doc.write_text(head + "typed\n" + tail)
    argv = [str(data), "--into", str(doc)]
    assert bench_report.main([*argv, "--check"]) == 1
    assert bench_report.main(argv) == 0
    text = doc.read_text()
    row = [line for line in text.splitlines() if line.startswith("| linattn_chunked |")]
    us = result["layers"][0]["us_per_token_fb"]
    assert row == [f"| linattn_chunked | {us:.1f} | not run | 1.00 |"], text
    assert "| mixer | at 32 | at 2k | × linattn_chunked at 32 |" in text
    assert "One decode step, ms at a context of 1024: linattn_chunked 0.500." in text
    assert bench_report.main([*argv, "--check"]) == 0
    doc.write_text("# no markers\n")
    capsys.readouterr()
    assert bench_report.main([*argv, "--check"]) == 2
    assert "no line starting" in capsys.readouterr().err
