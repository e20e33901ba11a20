r"""Command line: train a config into a workdir (resuming if it holds checkpoints).

  python -m ttt.main --config experiments/lm.py:ttt_linear,smoke --workdir /tmp/run \
      [--config.train.steps=10 ...]

Several processes (one per host, or local CPU processes in tests) pass --num_processes,
--process_id and --coordinator_address, or --distributed to let JAX auto-detect the cluster.
Exit status: 0 done, 2 bad config, 3 non-finite loss, 143 preempted (checkpoint saved).
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from ttt.config import ConfigError, flag_error_line
from ttt.train import NonFiniteLossError, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiments/<task>.py:<arg>",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics and the resolved config go here")
flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with auto-detection")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
flags.DEFINE_integer("num_processes", 1, "number of processes (multi-process)")
flags.DEFINE_integer("process_id", 0, "this process's index (multi-process)")
flags.DEFINE_bool("compile_only", False, "lower and compile the train step on abstract inputs, "
                  "print parameters, per-device memory and FLOPs, and exit")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's flag parsing; a bad flag, config argument or override is one line and exit 2."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError) as err:  # the latter: an unknown override
        print(f"error: {flag_error_line(err)}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    logging.getLogger("ttt").setLevel(logging.INFO)
    if FLAGS.num_processes > 1:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    if FLAGS.compile_only:
        from ttt.train.compile_only import run

        try:
            run(FLAGS.config)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    try:
        summary = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)
    if summary["preempted"]:
        sys.exit(143)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
