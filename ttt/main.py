r"""Command line: train a config into a workdir (resuming if it holds checkpoints).

  python -m ttt.main --config=experiments/lm.py:ttt_linear,smoke --workdir=/tmp/run \
      [--config.train.steps=10 --config.model.width=96 --config.model.mixer_kwargs.mini_batch=8]
  python -m ttt.main --config=experiments/lm.py:ttt_mlp,125m,paper --compile_only \
      --simulate_devices=8 [--workdir=DIR] [--strict] [--config.train.mesh.model=2]
  python -m ttt.main --config=experiments/lm.py:ttt_linear,cpu --workdir=/tmp/ft \
      --config.init.from_workdir=/tmp/run      # start from another run's parameters
      (or --config.init.transformer_workdir=DIR, --config.init.official_checkpoint=FILE)

Every field of the config file can be overridden with --config.<section>.<key>=<value>. Several
processes (one per host) pass --num_processes, --process_id and --coordinator_address, or
--distributed to let JAX detect the cluster.
Exit status: 0 done, 2 bad input (one line on stderr saying what to change; --debug adds the
traceback; also for a failed checkpoint save or out of memory), 3 non-finite loss, 143 preempted
by SIGTERM, 130 interrupted by SIGINT / Ctrl-C (both with a checkpoint saved; a second signal
exits at once).
"""

from __future__ import annotations

import sys

from ttt import cli
from ttt.config import with_defaults

FLAGS = (
    cli.Flag("workdir", str, None, "checkpoints, metrics and the resolved config go here"),
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
                                     source=values["config"])
    except NonFiniteLossError as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 3
    if summary["preempted"]:  # a checkpoint was saved; 128 + the signal's number
        return 130 if summary.get("signal") == "SIGINT" else 143
    return 0


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
