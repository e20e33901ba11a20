"""What a comparison trains (`python -m experiments.compare`): the mixers compared, MQAR's pair
counts, learning rates and best rates, the seeds, the cost table that orders the runs, `Cell` and
`Run`, the cell builders and the presets (lists of cells).

To add a mixer to the comparison (e.g. a new registry entry), add its name to MQAR_MIXERS and/or
COMPARE_LM_MIXERS below (LM_MIXERS: the demo's LMs too). A variant that is not one registry name
(a gate, a hybrid stack) is a VARIANTS entry: its cells train the entry's mixer with its overrides.

The `frontier` preset is Zoology's capacity frontier: MQAR at 256 tokens and 64 pairs at widths
64 / 128 / 256, accuracy against state floats per layer. Softmax attention must reach 0.99 at
every width before the other points measure the mixers; what it took (seed 0, lr 3e-3, one
core each, AMD EPYC, 2026-12-07; `python -m ttt.main --config
experiments/mqar.py:softmax,harness,kv=64,n=256,width=W[,mix] --config.train.steps=S`):
- the harness as it is (64 pairs in every training sequence, 20,000 of them), 1,750 steps:
  width 64 ended at 0.030 (eval loss 4.66): it never left the plateau of guessing a value;
- the `mix` flag (Zoology's training mixture: pair counts 4, 8, 16, 32, 64 in turn, 100,000
  distinct sequences), 1,750 steps: width 128 escaped at ~step 1,250 and ended at 0.875
  (0.096 at 1,250, 0.724 at 1,500); width 256 was still on the plateau at step 788 (0.014)
  when it was stopped;
- `mix`, 3,000 steps (FRONTIER_STEPS): width 64 0.998 at step 1,250, 0.9998 at 1,750 (stopped
  at 1,800); width 128 0.999 at step 1,000, 1.000 at 1,500 (stopped there).
- width 256, `mix`, 3,000 steps: at lr 3e-3 it never left the plateau (0.021 at the end; ~1.8
  s a step on one core); at lr 1e-3 (--config.optim.lr=1e-3) 0.756 at step 500, 0.9999 at 750
  (stopped at 883; ~2.4 s a step). So every mixer trains at 1e-3 at that width (FRONTIER_LR).
"""

from __future__ import annotations

import dataclasses
import os

# The mixers compared; a new registry entry joins every MQAR / LM cell by being listed here.
# Variants (cell names) that are not one registry name: (the spec's mixer, its overrides); a
# hybrid's sliding window / KV cache follow the task's length (`variant`).
HYBRID_TTT_SWA = "hybrid_ttt_swa"  # TTT-Linear with one sliding-window attention layer in four
HYBRID_GDN_SOFTMAX = "hybrid_gdn_softmax"  # Gated DeltaNet with one softmax layer in four
VARIANTS = {
    "ttt_linear_gate": ("ttt_linear", ("model.mixer_kwargs.gate=True",)),
    HYBRID_TTT_SWA: ("ttt_linear", ("model.num_layers=4",
                                    "model.pattern=ttt_linear,ttt_linear,ttt_linear,swa")),
    HYBRID_GDN_SOFTMAX: ("gated_deltanet", (
        "model.num_layers=4",
        "model.pattern=gated_deltanet,gated_deltanet,gated_deltanet,softmax")),
}
NEW_MIXERS = ("deltanet", "gated_deltanet", "mamba2", "titans", *VARIANTS)
MQAR_MIXERS = ("linear_attention", "ttt_linear", "ttt_mlp", "lact", "softmax", *NEW_MIXERS)
LM_MIXERS = ("linear_attention", "ttt_linear", "ttt_mlp", "softmax")
COMPARE_LM_MIXERS = (*LM_MIXERS, "lact", *NEW_MIXERS)  # the demo leaves the large-chunk layer out
LADDER = ("linear_attn", "linear_attn_plain", "ttt_equivalence", "learnable_W0", "ln_residual",
          "mini_batch", "learnable_eta", "mamba_backbone")

HARNESS_STEPS = 1750  # experiments/mqar.py's (not imported here: it imports JAX; a test
# holds the two equal)
# MQAR, the harness setting: sequence length 64, width 64, 1,750 steps of 64 sequences
# (experiments/mqar.py, `harness`). The sweep is Zoology's per-mixer learning-rate search; the
# demo trains at 8 pairs at MQAR_BEST_LR, softmax at 2 seeds (the harness validated), the
# others at one, each at the rate the `compare` sweep picked (README): 3e-3 for every mixer but
# linear attention (1e-3: 0.258 vs 0.104 at 8 pairs, seed 0).
MQAR_PAIRS = (8, 16)
MQAR_LRS = (1e-3, 3e-3)  # 1e-2 was the worst rate for softmax and linear attention
# MQAR_BEST_LR: the learning rate per mixer of the MQAR cells that do not sweep (the demo's),
# as above; a mixer not listed trains at 3e-3 (`_mqar_cells`).
MQAR_BEST_LR = {"linear_attention": 1e-3, "ttt_linear": 3e-3, "ttt_mlp": 3e-3, "softmax": 3e-3}
SEEDS = (0, 1, 2)
# The demo's MQAR leaves TTT-MLP out (its run alone would take a third of the demo's budget).
DEMO_MQAR_MIXERS = ("linear_attention", "ttt_linear", "softmax")
# The demo's two new rows: LMs at its small budget (an MQAR run of either would take minutes).
DEMO_NEW_LM = ("gated_deltanet", HYBRID_TTT_SWA)
# Rough CPU seconds of one run on one idle core (measured; the pool starts the longest first so
# the last worker does not finish long after the others). Unlisted: 300 (MQAR), 200 (LM).
# Used only to order the runs (`Cell.cost`, see experiments.scheduler._order).
COST = {("mqar", "softmax"): 170, ("mqar", "linear_attention"): 200, ("mqar", "ttt_linear"): 280,
        ("mqar", "lact"): 800,  # estimated: 715 s on both cores (2026-11-30)
        ("mqar", "ttt_mlp"): 550, ("lm", "softmax"): 1100, ("lm", "ttt_mlp"): 200,
        ("lm", "ttt_linear"): 150, ("lm", "linear_attention"): 110, ("init", "ttt_linear"): 150,
        # The new rows: CPU seconds per step of each cell's compiled train step (the loop of
        # `experiments.bench.measure_small_model` with the cell's overrides; 20 steps of the
        # MQAR harness at 8 pairs, 4 of the 2k LM, after two warm-up steps), one process on an
        # idle AMD EPYC, 2026-12-07, scaled by TTT-Linear's measured the same way (MQAR 0.190 s,
        # LM 0.170 s per step) to its entry above.
        ("mqar", "deltanet"): 440, ("mqar", "gated_deltanet"): 460, ("mqar", "mamba2"): 560,
        ("mqar", "ttt_linear_gate"): 310, ("mqar", HYBRID_TTT_SWA): 480,
        ("mqar", HYBRID_GDN_SOFTMAX): 630,
        # Their 2k LM entries: the CPU seconds of their grid runs (2026-12-07, one pinned core
        # each of a busy 2-core Intel Xeon; 108–193 s, the Gated DeltaNet hybrid 578 s) over
        # 1.33, as Titans' MQAR entry below
        ("lm", "deltanet"): 100, ("lm", "gated_deltanet"): 140, ("lm", "mamba2"): 145,
        ("lm", "ttt_linear_gate"): 80, ("lm", HYBRID_TTT_SWA): 120,
        ("lm", HYBRID_GDN_SOFTMAX): 435,
        # Titans (its chunk in the dual form): the same measurement on a 2-core Intel Xeon with
        # both cores busy, 2026-12-07, scaled by TTT-Linear's measured in the same process
        # (MQAR 0.737 / 0.232 s, LM 0.592 / 0.257 s per step); its MQAR entry raised to its two
        # sweep runs' 1,530 / 1,560 CPU s over 1.33, what the other new cells' runs of that day
        # took over their entries above
        ("mqar", "titans"): 1150,
        # the LM runs Titans' token recurrence (experiments/lm.py): 642 CPU s a run with both
        # cores busy (2026-12-07, Intel Xeon), over 1.33 as above
        ("lm", "titans"): 480}


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


def variant(name: str, tokens: int, window: int) -> tuple[str, tuple[str, ...]]:
    """(the spec's mixer, the overrides) of a cell's variant at a sequence of `tokens`: a
    registry name as it is; a VARIANTS entry with its overrides, a hybrid's sliding window of
    `window` tokens (MQAR: a quarter of the sequence, 16 at 64 tokens; the LMs: an eighth of
    the context, 256 at 2k) and its softmax layer's
    KV cache the whole sequence (as experiments/mqar.py gives softmax attention)."""
    if name not in VARIANTS:
        return name, ()
    mixer, overrides = VARIANTS[name]
    if name == HYBRID_TTT_SWA:
        overrides += (f"model.mixer_kwargs.swa.window={window}",)
    if name == HYBRID_GDN_SOFTMAX:
        overrides += (f"model.mixer_kwargs.softmax.cache_size={tokens}",)
    return mixer, overrides


def _mqar_cells(pairs, seeds, lrs, mixers=MQAR_MIXERS, rank: int = 0, n: int = 64,
                width: int | None = None, extra=(), flags: str = "",
                steps: int = HARNESS_STEPS, lr: float | None = None) -> list[Cell]:
    """One cell per pair count and mixer, softmax first (it validates the harness); at n
    tokens (the harness's 64 unless given) and the harness's width unless given; `flags`:
    more tokens of the spec (",mix"); without `lrs` (no sweep) every mixer trains at `lr`, or
    at its MQAR_BEST_LR when None."""
    out = []
    for kv in pairs:
        for m in sorted(mixers, key=lambda m: m != "softmax"):
            mixer, overrides = variant(m, n, n // 4)
            rate = MQAR_BEST_LR.get(m, 3e-3) if lr is None else lr
            fixed = () if lrs else (f"optim.lr={rate}",)
            arg = f"{mixer},harness,kv={kv}" + (f",n={n}" if n != 64 else "") + (
                f",width={width}" if width else "") + flags
            name = f"{m}_kv{kv}" + (f"_n{n}_w{width}" if width else "")
            scale = (n / 64) * ((width or 64) / 64) * steps / HARNESS_STEPS  # tokens x width x
            # steps (softmax at 256 tokens: 0.51 / 0.79 / 1.67 s a step at widths 64 / 128 /
            # 256 measured, 0.39 / 0.78 / 1.55 so estimated)
            out.append(Cell("mqar", name, f"experiments/mqar.py:{arg}",
                            (*overrides, *fixed, *extra), seeds, tuple(lrs),
                            cost=COST.get(("mqar", m), 300) * scale, rank=rank))
    return out


def _lm_cells(ctx: str, seeds, overrides=(), scale: float = 1.0, rank: int = 0,
              mixers=LM_MIXERS, init: bool = True) -> list[Cell]:
    """Long-context LMs (`experiments/lm.py`, `long` scale) with the loss by position, and
    TTT-Linear started from the trained Transformer of the same seed (same budget) — its
    from-scratch twin is the lm cell of the same spec."""
    tokens = int(ctx.rstrip("k")) * 1024 if ctx.endswith("k") else int(ctx)
    cells = []
    for m in sorted(mixers, key=lambda m: m != "softmax"):  # init waits on softmax
        mixer, own = variant(m, tokens, tokens // 8)
        cells.append(Cell("lm", m, f"experiments/lm.py:{mixer},long,ctx={ctx}",
                          (*own, *overrides), seeds, by_position=True,
                          cost=COST.get(("lm", m), 200) * scale, rank=rank))
    if not init:
        return cells
    cells.append(Cell("init", "ttt_linear_from_softmax", f"experiments/lm.py:ttt_linear,long,"
                      f"ctx={ctx}", tuple(overrides), seeds, by_position=True,
                      init_from="lm/softmax", cost=COST[("init", "ttt_linear")] * scale,
                      rank=rank))
    return cells


FRONTIER_N, FRONTIER_PAIRS, FRONTIER_WIDTHS = 256, 64, (64, 128, 256)
FRONTIER_STEPS = 3000  # with the pair-count mixture (module docstring: what it took)
# The rate of every mixer at a width where the harness's best rates failed softmax attention
# (module docstring: at width 256, 3e-3 stayed on the plateau, 1e-3 solved the task).
FRONTIER_LR = {256: 1e-3}


def frontier_cells(steps: int = FRONTIER_STEPS, mixers=MQAR_MIXERS) -> list[Cell]:
    """The capacity frontier: MQAR at FRONTIER_N tokens and FRONTIER_PAIRS pairs, every mixer
    at every width of FRONTIER_WIDTHS at the best rate of the harness (MQAR_BEST_LR) or the
    width's FRONTIER_LR, one seed per point and SEEDS at the middle width, trained on the
    mixture of pair counts (`mix`); `steps` training steps (eval every eighth)."""
    budget = (f"train.steps={steps}", f"train.eval_every={max(steps // 8, 1)}",
              f"train.checkpoint_every={steps}")
    mid = FRONTIER_WIDTHS[len(FRONTIER_WIDTHS) // 2]
    return [cell for w in FRONTIER_WIDTHS for cell in _mqar_cells(
        (FRONTIER_PAIRS,), SEEDS if w == mid else (0,), (), mixers, n=FRONTIER_N, width=w,
        extra=budget, rank=0 if w == mid else 1, flags=",mix", steps=steps,
        lr=FRONTIER_LR.get(w))]


PRESETS: dict[str, list[Cell]] = {
    "demo": (
        _mqar_cells((8,), SEEDS[:2], (), ("softmax",))  # 2 seeds: the harness validated twice
        + _mqar_cells((8,), (0,), (), [m for m in DEMO_MQAR_MIXERS if m != "softmax"])
        + _lm_cells("1k", (0,), ("train.steps=150",), scale=0.15,
                    mixers=(*LM_MIXERS, *DEMO_NEW_LM))
        + [Cell("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu")
           for t in (0, 2)]
    ),
    # Scheduling (see scheduler._order): rank 0 = softmax attention on MQAR at 8 pairs (it
    # validates the harness); rank 1 = the long-context LMs, TTT from the Transformer and the
    # other mixers on MQAR at 8 pairs, seed by seed; rank 2 = MQAR at 16 pairs; rank 3 = the
    # ladder and vision; rank 4 = the mixers added last (NEW_MIXERS: Gated DeltaNet, DeltaNet,
    # Mamba2, Titans, gated TTT-Linear, the hybrids) on MQAR at 8 and 16 pairs and the 2k LMs,
    # so the first ranks (~3 h on 2 cores) finish as before and these (~6 h more: their 81
    # runs took 12.5 CPU hours, 2026-12-07) come after. An interrupted comparison has the
    # headline cells first.
    "compare": (
        _mqar_cells(MQAR_PAIRS[:1], SEEDS, MQAR_LRS, ("softmax",))
        + _lm_cells("2k", SEEDS, rank=1, mixers=[m for m in COMPARE_LM_MIXERS
                                                 if m not in NEW_MIXERS])
        + _mqar_cells(MQAR_PAIRS[:1], SEEDS, MQAR_LRS,
                      [m for m in MQAR_MIXERS if m not in ("softmax", *NEW_MIXERS)], rank=1)
        + _mqar_cells(MQAR_PAIRS[1:], SEEDS, MQAR_LRS,
                      [m for m in MQAR_MIXERS if m not in ("lact", *NEW_MIXERS)],
                      rank=2)  # LaCT (~4x softmax's time at this scale) at 8 pairs only
        + [Cell("ladder", f"{i + 1}_{r}", f"experiments/ablation.py:{r},cpu", seeds=SEEDS,
                rank=3) for i, r in enumerate(LADDER)]
        + [Cell("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu",
                seeds=SEEDS, cost=90, rank=3) for t in (0, 1, 2, 4)]
        + _mqar_cells(MQAR_PAIRS, SEEDS, MQAR_LRS, NEW_MIXERS, rank=4)
        + _lm_cells("2k", SEEDS, rank=4, mixers=NEW_MIXERS, init=False)
    ),
    "frontier": frontier_cells(),
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
PRESET_JOBS = {"demo": 0, "compare": 0, "frontier": 0, "tiny": 1}


def runs_of(cell: Cell) -> int:
    """How many runs a cell trains: the sweep's extra rates on the first seed, then the seeds."""
    return len(cell.seeds) + max(len(cell.lrs) - 1, 0)


def estimate_s(cells, jobs: int = 2) -> float:
    """Rough wall seconds of a list of cells on `jobs` idle cores (COST, estimated entries
    included): the runs' summed cost over the workers."""
    return sum(c.cost * runs_of(c) for c in cells) / jobs
