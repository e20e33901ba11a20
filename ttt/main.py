r"""Command line: train a config into a workdir (resuming if it holds checkpoints).

  python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/run \
      [--config.train.steps=10 --config.model.width=96 --config.model.mixer_kwargs.mini_batch=8]
  python -m ttt.main --config=experiments/lm.py:ttt_mlp,125m,paper --compile_only \
      --simulate_devices=8 [--workdir=DIR] [--strict] [--config.train.mesh.model=2]
  python -m ttt.main --config=experiments/lm.py:ttt_linear,cpu --workdir=/tmp/ft \
      --config.init.from_workdir=/tmp/run      # start from another run's parameters
      (or --config.init.transformer_workdir=DIR, --config.init.official_checkpoint=FILE)
  python -m ttt.main ... --workdir=/tmp/run --config.optim.lr=1e-3 --resume_step=200
      # restart from checkpoint 200 (the later ones move to diverged_checkpoints/)

  python -m ttt.main --list[=configs|mixers|presets|fields]   # what there is to run

Every field of the config file can be overridden with --config.<section>.<key>=<value>. Several
processes (one per host) pass --num_processes, --process_id and --coordinator_address, or
--distributed to let JAX detect the cluster. A non-finite loss (exit 3) prints the checkpoints with
their training loss and parameter norm, and the command that restarts from the last one saved
before the loss blew up (`--resume_step`, with a 10x lower learning rate).
Exit status: 0 done, 2 bad input (one line on stderr saying what to change; --debug adds the
traceback; also for a failed checkpoint save or out of memory), 3 non-finite loss, 143 preempted
by SIGTERM, 130 interrupted by SIGINT / Ctrl-C (both with a checkpoint saved; a second signal
exits at once).
"""

from __future__ import annotations

import shlex
import sys

from ttt import budget, cli, extensions
from ttt.config import with_defaults

FLAGS = (
    cli.Flag("workdir", str, None, "checkpoints, metrics and the resolved config go here"),
    cli.Flag("list", str, None, "print the catalogue and exit: --list (all) or "
             "--list=configs|mixers|presets|fields (config files and their tokens, registered "
             "mixers, model sizes, config fields with defaults and domains)"),
    cli.Flag("import", str, None, "comma-separated .py files or modules to import first: your own "
             "learners and mixers (register_learner / register_mixer); recorded in the run's "
             "config as config.imports (docs/extending.md)"),
    cli.Flag("compile_only", bool, False, "lower and compile the train step on abstract inputs, "
             "print the sharding report (per-device memory, collectives, XLA warnings; "
             "DIR/compile_report.json with --workdir=DIR) and exit"),
    cli.Flag("simulate_devices", int, 0, "run on this many CPU devices (set before JAX starts), "
             "e.g. to compile a multi-device mesh on a laptop"),
    cli.Flag("strict", bool, False, "with --compile_only: exit 2 if XLA printed any warning"),
    cli.Flag("distributed", bool, False, "jax.distributed.initialize() with auto-detection"),
    cli.Flag("coordinator_address", str, None, "host:port of process 0 (multi-process)"),
    cli.Flag("num_processes", int, 1, "number of processes (multi-process)"),
    cli.Flag("process_id", int, 0, "this process's index (multi-process)"),
    cli.Flag("resume_step", int, None, "restart from this checkpoint of the workdir (0: from "
             "the initialisation); the later checkpoints move to WORKDIR/diverged_checkpoints/"),
    cli.DEBUG,
)


def _list_request(argv: list[str]) -> tuple[bool, str | None, str | None]:
    """(asked, section, imports) of `--list[=section]` [`--import=...`]: the catalogue needs no
    config, so it is answered before the flags are parsed."""
    asked, section, imports = False, None, None
    for arg in argv:
        name, eq, text = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "list":
            asked, section = True, text if eq else None
        elif arg.startswith("-") and name == "import" and eq:
            imports = text
    return asked, section, imports


def _main(argv: list[str]) -> int:
    asked, section, imports = _list_request(argv)
    if asked:
        from ttt.catalogue import catalogue

        extensions.load(imports)  # your own mixers and learners are listed too
        try:
            sys.stdout.write(catalogue(section))
        except ValueError as err:
            raise cli.UsageError(str(err)) from None
        return 0
    values, overrides = cli.parse_flags(argv, FLAGS, prog="python -m ttt.main", doc=__doc__,
                                        config=True)
    if values["resume_step"] is not None and values["resume_step"] < 0:
        raise cli.UsageError(f"--resume_step={values['resume_step']}: must be a checkpoint step "
                             ">= 0 (0: start over)")
    if not values["compile_only"] and not values["workdir"]:
        raise cli.UsageError("--workdir is required: the run's checkpoints, metrics and "
                             "config.json go there (or pass --compile_only)")
    imports = extensions.load(values["import"])  # before the config names what they register
    defaults = with_defaults(cli.load_config(values["config"]))
    if imports:
        with defaults.unlocked():
            defaults.imports = imports
    config = cli.apply_overrides(with_defaults(defaults), overrides)
    budget.follow_steps(config, defaults.train.get("steps"), [key for key, _ in overrides])

    if values["simulate_devices"]:
        simulate_devices(values["simulate_devices"])
    # JAX, and everything that imports it, only now: the device count above must be set before
    # JAX starts, and bad flags fail without importing it
    import jax

    if values["num_processes"] > 1:
        jax.distributed.initialize(values["coordinator_address"], values["num_processes"],
                                   values["process_id"])
    elif values["distributed"]:
        jax.distributed.initialize()
    if values["compile_only"]:
        from ttt.train.compile_only import run

        run(config, workdir=values["workdir"], strict=values["strict"])
        return 0
    from ttt.train import NonFiniteLossError, train_and_evaluate

    try:
        summary = train_and_evaluate(config, values["workdir"], defaults=defaults,
                                     source=values["config"], resume_step=values["resume_step"])
    except NonFiniteLossError as err:
        lr = float(config.optim.lr)
        print("\n".join([
            f"error: {cli.one_line(err)}", *err.details,
            f"to restart from step {err.restart_step} with a 10x lower rate (now "
            f"config.optim.lr={lr:g}; lower it further if the loss blows up again):",
            "  " + restart_command(argv, err.restart_step, lr / 10)]), file=sys.stderr)
        return 3
    if summary["preempted"]:  # a checkpoint was saved; 128 + the signal's number
        return 130 if summary.get("signal") == "SIGINT" else 143
    return 0


def restart_command(argv: list[str], step: int, lr: float) -> str:
    """This command line with `--config.optim.lr=lr --resume_step=step` in place of its own."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.lstrip("-").partition("=")[0]
        if name in ("resume_step", "config.optim.lr"):
            skip = "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["python", "-m", "ttt.main", *kept, f"--config.optim.lr={lr:g}",
                       f"--resume_step={step}"])


def simulate_devices(n: int) -> None:
    """Make JAX start on `n` CPU devices (before its backend initialises; a no-op if it already
    runs on exactly those)."""
    if n < 1:
        raise cli.UsageError(f"--simulate_devices={n}: expected a positive number of devices")
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.default_backend() == "cpu" and jax.device_count() == n:
            return
        raise cli.UsageError(f"--simulate_devices={n}: JAX already runs on {jax.device_count()} "
                             f"{jax.default_backend()} device(s); pass it in a fresh process")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def main(argv=None) -> int:
    """The `python -m ttt.main` entry point: returns the exit status (see the module doc)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
