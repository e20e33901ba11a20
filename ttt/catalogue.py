"""What there is to run: `python -m ttt.main --list[=configs|mixers|presets|fields]`.

- configs: the experiment files (experiments/*.py with a token grammar) with their tokens;
- mixers:  every registry entry (shipped and registered by `--import`), whether it decodes, its
           non-causal twin, its recurrent state at the 125m layer shape, and one line on what it is;
- presets: the named model sizes;
- fields:  every config field of the default LM config with its default, and the domain of each
           numeric field (`ttt.config.DOMAINS`, checked before anything compiles).
Printed as plain text, one item per line (grep-able).
"""

from __future__ import annotations

import importlib.util
import os

SECTIONS = ("configs", "mixers", "presets", "fields")
CONFIG_FILES = ("experiments/lm.py", "experiments/mqar.py", "experiments/vit.py",
                "experiments/ablation.py")
REF = dict(width=768, num_heads=12)  # the 125m layer shape the state sizes are given at


def _first_line(doc: str | None, limit: int = 120) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    sentence = paragraph.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit - 1].rstrip() + "…"


def _load_file(path: str):
    name = "_ttt_catalogue_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def configs() -> list[str]:
    """One block per experiment file: its path, what it is, the tokens it accepts."""
    lines = []
    for path in CONFIG_FILES:
        if not os.path.isfile(path):
            lines.append(f"{path}: not found here (run from the repository root)")
            continue
        module = _load_file(path)
        grammar = getattr(module, "GRAMMAR", None)
        lines.append(f"{path}: {_first_line(module.__doc__)}")
        if grammar is not None:
            lines.append(f"    --config={path}:<tokens>  {grammar.known()}")
    return lines


def _state(name: str, seq_len: int) -> int | None:
    from ttt.layers import state_size

    try:
        return state_size(name, REF["width"], REF["num_heads"], seq_len)
    except (ValueError, TypeError, KeyError):
        return None


def mixers() -> list[str]:
    """One line per registry entry."""
    from ttt.layers import MIXERS

    lines = [f"state: recurrent floats per layer per sequence at width {REF['width']}, "
             f"{REF['num_heads']} heads (N = context length)"]
    for name, spec in MIXERS.items():
        short, long_ = _state(name, 1024), _state(name, 4096)
        if short is None:
            state = "state n/a"
        elif short == long_:
            state = f"state {short:,}"
        else:
            state = f"state {short:,} at N=1k, {long_:,} at N=4k"
        decode = "decodes" if spec.causal else "non-causal"
        twin = f", twin {spec.noncausal}" if spec.noncausal else ""
        what = spec.description or _first_line(spec.module.__doc__)
        defaults = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items())
        lines.append(f"{name}: {decode}{twin}; {state}; {what}"
                     + (f" [{defaults}]" if defaults else ""))
    return lines


def presets() -> list[str]:
    from ttt.models.presets import PRESETS

    return [f"{kind} {name}: " + ", ".join(f"{k}={v}" for k, v in dims.items())
            for kind, table in PRESETS.items() for name, dims in table.items()]


def _flatten(node, prefix=""):
    for key in node:
        value = node[key]
        if hasattr(value, "keys"):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def fields() -> list[str]:
    """Every field of the default LM config (`experiments/lm.py`, no tokens) and its domain."""
    from ttt.config import DOMAINS, with_defaults

    lines = []
    if os.path.isfile(CONFIG_FILES[0]):
        config = with_defaults(_load_file(CONFIG_FILES[0]).get_config(None))
        for key, value in _flatten(config):
            domain = DOMAINS.get(key)
            lines.append(f"config.{key} = {value!r}" + (f"  ({domain.describe()})" if domain
                                                         else ""))
        shown = {line.split(" = ")[0][len("config."):] for line in lines}
    else:
        shown = set()
    for key, domain in DOMAINS.items():  # numeric fields of other configs
        if key not in shown:
            lines.append(f"config.{key}  ({domain.describe()})")
    return lines


def catalogue(section: str | None = None) -> str:
    """The text `--list[=section]` prints; ValueError for an unknown section."""
    if section in (None, "", "all"):
        chosen = SECTIONS
    elif section in SECTIONS:
        chosen = (section,)
    else:
        raise ValueError(f"--list={section}: expected one of {', '.join(SECTIONS)} (or --list "
                         "alone for all)")
    makers = {"configs": configs, "mixers": mixers, "presets": presets, "fields": fields}
    out = []
    for name in chosen:
        out += [f"== {name}", *makers[name](), ""]
    return "\n".join(out).rstrip() + "\n"
