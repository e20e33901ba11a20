r"""Command line: train a config into a workdir (resuming if it holds checkpoints).

  python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/run \
      [--config.train.steps=10 --config.model.width=96 --config.model.mixer_kwargs.mini_batch=8]
  python -m ttt.main --config=experiments/lm.py:ttt_mlp,125m,paper --compile_only \
      [--config.train.mesh.fsdp=1]
  python -m ttt.main --config=experiments/lm.py:ttt_linear,cpu --workdir=/tmp/ft \
      --config.init.from_workdir=/tmp/run      # start from another run's parameters
      (or --config.init.transformer_workdir=DIR, --config.init.official_checkpoint=FILE)

Every field of the config file can be overridden with --config.<section>.<key>=<value>. Several
processes (one per host) pass --num_processes, --process_id and --coordinator_address, or
--distributed to let JAX detect the cluster.
Exit status: 0 done, 2 bad input (one line on stderr saying what to change; --debug adds the
traceback), 3 non-finite loss, 143 preempted (checkpoint saved).
"""

from __future__ import annotations

import sys

from ttt import cli
from ttt.config import with_defaults

FLAGS = (
    cli.Flag("workdir", str, None, "checkpoints, metrics and the resolved config go here"),
    cli.Flag("compile_only", bool, False, "lower and compile the train step on abstract inputs, "
             "print parameters, per-device memory and FLOPs, and exit (no --workdir needed)"),
    cli.Flag("distributed", bool, False, "jax.distributed.initialize() with auto-detection"),
    cli.Flag("coordinator_address", str, None, "host:port of process 0 (multi-process)"),
    cli.Flag("num_processes", int, 1, "number of processes (multi-process)"),
    cli.Flag("process_id", int, 0, "this process's index (multi-process)"),
    cli.DEBUG,
)


def _main(argv: list[str]) -> int:
    values, overrides = cli.parse_flags(argv, FLAGS, prog="python -m ttt.main", doc=__doc__,
                                        config=True)
    if not values["compile_only"] and not values["workdir"]:
        raise cli.UsageError("--workdir is required: the run's checkpoints, metrics and "
                             "config.json go there (or pass --compile_only)")
    defaults = with_defaults(cli.load_config(values["config"]))
    config = cli.apply_overrides(with_defaults(defaults), overrides)

    import jax

    if values["num_processes"] > 1:
        jax.distributed.initialize(values["coordinator_address"], values["num_processes"],
                                   values["process_id"])
    elif values["distributed"]:
        jax.distributed.initialize()
    if values["compile_only"]:
        from ttt.train.compile_only import run

        run(config)
        return 0
    from ttt.train import NonFiniteLossError, train_and_evaluate

    try:
        summary = train_and_evaluate(config, values["workdir"], defaults=defaults,
                                     source=values["config"])
    except NonFiniteLossError as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 3
    return 143 if summary["preempted"] else 0


def main(argv=None) -> int:
    """The `python -m ttt.main` entry point: returns the exit status (see the module doc)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
