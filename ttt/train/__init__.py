"""ttt.train: the outer loop — train/eval steps, parallel placements, checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole driver (`ttt.train.train`; `ttt.train.init`:
where a new run's weights start); `train_step` / `eval_step` are the pure steps it wraps with
`jit`, `pmap` or a sharded `jit` depending on `config.train.parallel`; `ttt.train.setup` builds
them from a config (shared with the compile-only report and `ttt.load_run`); `ttt.train.workdir`
checks a run's directory, `ttt.train.lock` holds it.
"""

from ttt.train.checkpoint import Checkpointer, CheckpointMismatchError
from ttt.train.divergence import NonFiniteLossError
from ttt.train.optim import lr_schedule, make_optimizer, ttt_lr_mult_schedule
from ttt.train.parallel import make_placement, partition_spec
from ttt.train.setup import abstract_state, build_setup, lower_train_step
from ttt.train.steps import Task, TrainState, eval_step, make_task, train_step
from ttt.train.train import train_and_evaluate
from ttt.train.workdir import WorkdirError

__all__ = [
    "CheckpointMismatchError", "Checkpointer", "NonFiniteLossError", "Task", "TrainState",
    "WorkdirError", "abstract_state", "build_setup", "eval_step", "lower_train_step",
    "lr_schedule", "make_optimizer", "make_placement", "make_task", "partition_spec",
    "train_and_evaluate", "train_step", "ttt_lr_mult_schedule",
]
