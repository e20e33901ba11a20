"""What a comparison trains (`python -m experiments.compare`): the mixers compared, MQAR's pair
counts, learning rates and best rates, the seeds, the cost table that orders the runs, `Cell` and
`Run`, the cell builders and the presets (lists of cells).

To add a mixer to the comparison (e.g. a new registry entry), add its name to MQAR_MIXERS and/or
COMPARE_LM_MIXERS below (LM_MIXERS: the demo's LMs too).
"""

from __future__ import annotations

import dataclasses
import os

# The mixers compared; a new registry entry joins every MQAR / LM cell by being listed here.
MQAR_MIXERS = ("linear_attention", "ttt_linear", "ttt_mlp", "lact", "softmax")
LM_MIXERS = ("linear_attention", "ttt_linear", "ttt_mlp", "softmax")
COMPARE_LM_MIXERS = (*LM_MIXERS, "lact")  # the demo's budget leaves the large-chunk layer out
LADDER = ("linear_attn", "linear_attn_plain", "ttt_equivalence", "learnable_W0", "ln_residual",
          "mini_batch", "learnable_eta", "mamba_backbone")

# MQAR, the harness setting: sequence length 64, width 64, 1,750 steps of 64 sequences
# (experiments/mqar.py, `harness`). The sweep is Zoology's per-mixer learning-rate search; the
# demo trains at 8 pairs at MQAR_BEST_LR, softmax at 3 seeds (the harness validated), the
# others at one, each at the rate the `compare` sweep picked (README): 3e-3 for every mixer but
# linear attention (1e-3: 0.258 vs 0.104 at 8 pairs, seed 0).
MQAR_PAIRS = (8, 16)
MQAR_LRS = (1e-3, 3e-3)  # 1e-2 was the worst rate for softmax and linear attention
# MQAR_BEST_LR: the learning rate per mixer of the MQAR cells that do not sweep (the demo's),
# as above; a mixer not listed trains at 3e-3 (`_mqar_cells`).
MQAR_BEST_LR = {"linear_attention": 1e-3, "ttt_linear": 3e-3, "ttt_mlp": 3e-3, "softmax": 3e-3}
SEEDS = (0, 1, 2)
# The demo's MQAR leaves TTT-MLP out (its run alone would take a third of the demo's budget).
DEMO_MQAR_MIXERS = tuple(m for m in MQAR_MIXERS if m not in ("ttt_mlp", "lact"))
# Rough CPU seconds of one run on one idle core (measured; the pool starts the longest first so
# the last worker does not finish long after the others). Unlisted: 300 (MQAR), 200 (LM).
# Used only to order the runs (`Cell.cost`, see experiments.scheduler._order).
COST = {("mqar", "softmax"): 170, ("mqar", "linear_attention"): 200, ("mqar", "ttt_linear"): 280,
        ("mqar", "lact"): 800,  # estimated: 715 s on both cores (2026-11-30)
        ("mqar", "ttt_mlp"): 550, ("lm", "softmax"): 1100, ("lm", "ttt_mlp"): 200,
        ("lm", "ttt_linear"): 150, ("lm", "linear_attention"): 110, ("init", "ttt_linear"): 150}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One comparison cell: a config trained once per seed (see experiments.compare's
    docstring)."""

    group: str  # report section: mqar, lm, init, ladder, vision
    name: str  # unique within the group
    spec: str  # experiments/<file>.py:<arg>
    overrides: tuple[str, ...] = ()  # key=value, as --set
    seeds: tuple[int, ...] = (0,)
    lrs: tuple[float, ...] = ()  # sweep on seeds[0], the other seeds at the best rate
    by_position: bool = False  # loss by token position on the validation split
    init_from: str | None = None  # "group/name" of the Transformer cell each seed starts from
    cost: float = 60.0  # rough CPU seconds of one run (scheduling only)
    rank: int = 0  # scheduling: lower ranks first, then seed by seed (see scheduler._order)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a cell: a seed, and a learning rate when the cell sweeps."""

    cell: Cell
    seed: int
    lr: float | None = None

    @property
    def key(self) -> str:
        tag = f"s{self.seed}" if self.lr is None else f"lr{self.lr:g}_s{self.seed}"
        return f"{self.cell.group}/{self.cell.name}/{tag}"


def run_overrides(run: Run, workdir: str, global_overrides=()) -> list[str]:
    """Every override of one run: the cell's, the command line's, then seed, lr and init."""
    out = [*run.cell.overrides, *global_overrides, f"train.seed={run.seed}"]
    if run.lr is not None:
        out.append(f"optim.lr={run.lr!r}")
    if run.cell.init_from:
        out.append(f"init.transformer_workdir={source_dir(run, workdir)}")
    return out


def source_dir(run: Run, workdir: str) -> str:
    """The run directory of the Transformer an `init_from` run starts from (same seed; the
    chosen learning rate when that cell sweeps)."""
    group, name = run.cell.init_from.split("/")
    return os.path.join(workdir, group, name, f"s{run.seed}")


def _mqar_cells(pairs, seeds, lrs, mixers=MQAR_MIXERS, rank: int = 0) -> list[Cell]:
    """One cell per pair count and mixer, softmax first (it validates the harness)."""
    out = []
    for kv in pairs:
        for m in sorted(mixers, key=lambda m: m != "softmax"):
            fixed = () if lrs else (f"optim.lr={MQAR_BEST_LR.get(m, 3e-3)}",)
            out.append(Cell("mqar", f"{m}_kv{kv}", f"experiments/mqar.py:{m},harness,kv={kv}",
                            fixed, seeds, tuple(lrs), cost=COST.get(("mqar", m), 300),
                            rank=rank))
    return out


def _lm_cells(ctx: str, seeds, overrides=(), scale: float = 1.0, rank: int = 0,
              mixers=LM_MIXERS) -> list[Cell]:
    """Long-context LMs (`experiments/lm.py`, `long` scale) with the loss by position, and
    TTT-Linear started from the trained Transformer of the same seed (same budget) — its
    from-scratch twin is the lm cell of the same spec."""
    cells = [Cell("lm", m, f"experiments/lm.py:{m},long,ctx={ctx}", tuple(overrides), seeds,
                  by_position=True, cost=COST.get(("lm", m), 200) * scale, rank=rank)
             for m in sorted(mixers, key=lambda m: m != "softmax")]  # init waits on softmax
    cells.append(Cell("init", "ttt_linear_from_softmax", f"experiments/lm.py:ttt_linear,long,"
                      f"ctx={ctx}", tuple(overrides), seeds, by_position=True,
                      init_from="lm/softmax", cost=COST[("init", "ttt_linear")] * scale,
                      rank=rank))
    return cells


PRESETS: dict[str, list[Cell]] = {
    "demo": (
        _mqar_cells((8,), SEEDS, (), ("softmax",))  # 3 seeds: the harness validated
        + _mqar_cells((8,), (0,), (), [m for m in DEMO_MQAR_MIXERS if m != "softmax"])
        + _lm_cells("1k", (0,), ("train.steps=300",), scale=0.3)
        + [Cell("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu")
           for t in (0, 2)]
    ),
    # Scheduling (see scheduler._order): rank 0 = softmax attention on MQAR at 8 pairs (it
    # validates the harness); rank 1 = the long-context LMs, TTT from the Transformer and the
    # other mixers on MQAR at 8 pairs, seed by seed; rank 2 = MQAR at 16 pairs; rank 3 = the
    # ladder and vision.
    # An interrupted comparison has the headline cells first.
    "compare": (
        _mqar_cells(MQAR_PAIRS[:1], SEEDS, MQAR_LRS, ("softmax",))
        + _lm_cells("2k", SEEDS, rank=1, mixers=COMPARE_LM_MIXERS)
        + _mqar_cells(MQAR_PAIRS[:1], SEEDS, MQAR_LRS,
                      [m for m in MQAR_MIXERS if m != "softmax"], rank=1)
        + _mqar_cells(MQAR_PAIRS[1:], SEEDS, MQAR_LRS, [m for m in MQAR_MIXERS if m != "lact"],
                      rank=2)  # LaCT (~4x softmax's time at this scale) at 8 pairs only
        + [Cell("ladder", f"{i + 1}_{r}", f"experiments/ablation.py:{r},cpu", seeds=SEEDS,
                rank=3) for i, r in enumerate(LADDER)]
        + [Cell("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu",
                seeds=SEEDS, cost=90, rank=3) for t in (0, 1, 2, 4)]
    ),
    "tiny": [
        Cell("lm", "softmax", "experiments/lm.py:softmax,smoke", seeds=(0, 1), by_position=True),
        Cell("lm", "ttt_linear", "experiments/lm.py:ttt_linear,smoke"),
        Cell("mqar", "softmax_kv2", "experiments/mqar.py:softmax,n=16,kv=2,width=16,smoke",
             seeds=(0, 1), lrs=(1e-3, 3e-3)),
        Cell("init", "ttt_linear_from_softmax", "experiments/lm.py:ttt_linear,smoke",
             seeds=(0,), init_from="lm/softmax"),
    ],
}
# presets scheduled longest run first (to finish soonest) instead of by rank and seed
LONGEST_FIRST = ("demo",)
# preset -> worker processes (0: one per core, at most 2)
PRESET_JOBS = {"demo": 0, "compare": 0, "tiny": 1}
