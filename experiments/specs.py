"""A config spec (`experiments/<file>.py:<arg>`) and `key=value` overrides -> the config, as
`python -m ttt.main` loads it; shared by experiments.compare (and the runs it trains) and
experiments.bench."""

from __future__ import annotations

from ttt import budget, cli, extensions
from ttt.config import with_defaults


def load_config(spec: str, overrides=()):
    """'path/to/file.py:arg' and ['train.steps=100', ...] -> the file's get_config(arg) with the
    overrides set, exactly as `python -m ttt.main --config=<spec> --config.<key>=<value>` loads
    it (`ttt.cli.load_config`, `ttt.config.with_defaults`, `ttt.cli.apply_overrides`, and the
    step counts that follow a cut train.steps, `ttt.budget`).

    `imports=FILE.py,pkg.mod` (as `--set`) is `python -m ttt.main --import=...`: the modules that
    register your own mixers and learners are imported first (in every worker of a comparison)
    and recorded in the config.

    Raises `ttt.config.ConfigError` (one line naming the spec or the override) on any mistake.
    """
    pairs, imports = [], []
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise cli.UsageError(f"--set {item}: expected key=value, e.g. --set train.steps=100")
        if key == "imports":
            imports += extensions.load(text)
            continue
        pairs.append((key, text))
    defaults = with_defaults(cli.load_config(spec))
    if imports:
        with defaults.unlocked():
            defaults.imports = imports
    config = cli.apply_overrides(with_defaults(defaults), pairs)
    budget.follow_steps(config, defaults.train.get("steps"), [key for key, _ in pairs])
    return config
