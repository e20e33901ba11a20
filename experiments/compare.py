r"""Train a list of configs one after another and build one comparison report from their metrics.

  python -m experiments.compare --preset demo --workdir runs/demo          # what `make demo` runs
  python -m experiments.compare --workdir runs/mine \
      --configs experiments/lm.py:ttt_linear,cpu experiments/lm.py:softmax,cpu \
      [--set train.steps=100 ...]                                           # your own variants
  python -m experiments.compare --workdir runs/report --runs runs/a runs/b  # report only

A config is loaded exactly as `python -m ttt.main --config=<spec> --config.<key>=<value>` loads
it (`ttt.cli`: the same `file.py:arg` syntax, and `--set key=value` is the typed override
`--config.key=value`); a bad spec or override stops everything before training, in
one line (exit status 2). Each run trains in `WORKDIR/<group>/<name>` through
`ttt.train.train_and_evaluate` (the same driver as `python -m ttt.main`), so it logs
`metrics.jsonl`, TensorBoard events and a checkpoint there. A run whose `run.json` exists is
finished and is not trained again (pass --force to retrain); an interrupted one resumes from its
checkpoint. The report (`WORKDIR/report.md` and PNG plots, see `experiments.report`) is built only
from the runs' files and printed at the end.

The `demo` preset (2-core CPU, ~15 minutes in all) compares TTT-Linear, TTT-MLP, linear attention
and softmax attention on (1) a byte-level LM on the embedded corpus, (2) MQAR at three (length,
pairs) settings, (3) the TTT-LM ablation ladder and (4) MTTT-MLP on the embedded digits with
T = 0, 1, 2, 4 inner steps. `tiny` (two smoke runs) exercises the pipeline in tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
import time
import traceback

from ttt import cli
from ttt.config import ConfigError, with_defaults

FOUR = ("ttt_linear", "ttt_mlp", "linear_attention", "softmax")
MQAR_DEMO = ((64, 4), (64, 16))  # (sequence length, key-value pairs)

# preset -> [(group, name, "experiments/<file>.py:<arg>")]
PRESETS: dict[str, list[tuple[str, str, str]]] = {
    "demo": (
        [("lm", m, f"experiments/lm.py:{m},cpu") for m in (*FOUR, "lact")]
        + [("mqar", f"{m}_n{n}_kv{kv}", f"experiments/mqar.py:{m},n={n},kv={kv},cpu")
           for n, kv in MQAR_DEMO for m in FOUR]
        + [("ladder", f"{i + 1}_{r}", f"experiments/ablation.py:{r},cpu")
           for i, r in enumerate(("linear_attn", "linear_attn_plain", "ttt_equivalence",
                                  "learnable_W0", "ln_residual", "mini_batch", "learnable_eta",
                                  "mamba_backbone"))]
        + [("vision", f"mttt_mlp_T{t}", f"experiments/vit.py:mttt_mlp,T={t},cpu")
           for t in (0, 1, 2, 4)]
    ),
    "tiny": [
        ("lm", "linear_attention", "experiments/lm.py:linear_attention,smoke"),
        ("mqar", "softmax_n16_kv2", "experiments/mqar.py:softmax,n=16,kv=2,width=16,smoke"),
    ],
}
# preset -> (worker processes, groups trained alone in the main process). The LM runs go alone
# so their tokens/s are not shared with another run; the rest share the cores two at a time.
PRESET_JOBS = {"demo": (2, ("lm",)), "tiny": (1, ())}


def load_config(spec: str, overrides=()):
    """'path/to/file.py:arg' and ['train.steps=100', ...] -> the file's get_config(arg) with the
    overrides set, exactly as `python -m ttt.main --config=<spec> --config.<key>=<value>` loads
    it (`ttt.cli.load_config`, `ttt.config.with_defaults`, `ttt.cli.apply_overrides`).

    Raises `ttt.config.ConfigError` (one line naming the spec or the override) on any mistake.
    """
    pairs = []
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise cli.UsageError(f"--set {item}: expected key=value, e.g. --set train.steps=100")
        pairs.append((key, text))
    return cli.apply_overrides(with_defaults(cli.load_config(spec)), pairs)


def run_one(group: str, name: str, spec: str, run_dir: str, overrides: list[str],
            force: bool = False) -> dict:
    """Train `spec` in `run_dir` unless it already finished there; returns its run.json dict.

    Safe to call in a worker process (everything it needs is imported inside)."""
    marker = os.path.join(run_dir, "run.json")
    if os.path.exists(marker) and not force:
        with open(marker) as f:
            return json.load(f)
    if force and os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    from ttt.train import train_and_evaluate

    config = load_config(spec, overrides)
    info = {"name": name, "group": group, "spec": spec, "overrides": overrides}
    start = time.perf_counter()
    try:
        summary = train_and_evaluate(config, run_dir)
        info["step"] = int(summary["step"])
        if summary["preempted"]:  # SIGTERM: the checkpoint is saved; a rerun resumes there
            raise KeyboardInterrupt(f"{name} preempted at step {info['step']}")
    except Exception as err:  # one broken variant must not sink the whole comparison
        traceback.print_exc()
        info["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    info["wall_s"] = time.perf_counter() - start
    os.makedirs(run_dir, exist_ok=True)
    if "error" not in info:
        with open(marker, "w") as f:
            json.dump(info, f, indent=2)
    return info


def _run_pool(entries, args, jobs: int, done: int, total: int, start: float) -> dict:
    """Train `entries` in `jobs` fresh worker processes; one progress bar over the runs."""
    from tqdm import tqdm

    overrides = [*args.overrides, "train.progress=False"]  # one bar here, not one per worker
    ctx = multiprocessing.get_context("spawn")  # a clean JAX runtime per worker
    infos = {}
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool, \
            tqdm(total=total, initial=done, desc="runs", unit="run", file=sys.stderr) as bar:
        futures = {pool.submit(run_one, g, n, s, os.path.join(args.workdir, g, n), overrides,
                               args.force): (g, n) for g, n, s in entries}
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                infos[key] = future.result()
            except Exception as err:  # a worker died (e.g. out of memory)
                infos[key] = {"name": key[1], "group": key[0], "error": repr(err)}
            bar.set_postfix_str(f"{key[0]}/{key[1]} {infos[key].get('wall_s', 0):.0f}s")
            bar.update(1)
    print(f"{(time.perf_counter() - start) / 60:.1f} min elapsed", file=sys.stderr)
    return infos


def _entries(args) -> list[tuple[str, str, str]]:
    """(group, name, spec) of every run. Each spec is loaded here with the overrides, so a bad
    one fails before anything trains."""
    from experiments.report import group_of

    if args.preset:
        keep = set(args.only.split(",")) if args.only else None
        entries = [e for e in PRESETS[args.preset] if keep is None or e[0] in keep]
    else:
        entries = [(None, os.path.basename(spec.partition(":")[0])[:-3] + "_" +
                    spec.partition(":")[2].replace(",", "_").replace("=", ""), spec)
                   for spec in args.configs or []]
    out = []
    for group, name, spec in entries:
        config = load_config(spec, args.overrides)
        out.append((group or group_of(config.to_dict()), name.strip("_"), spec))
    return out


def _header(args, wall: float, failures: list[dict]) -> str:
    import jax

    lines = [f"Command: `python -m experiments.compare {' '.join(args.argv)}`",
             f"Device: {jax.devices()[0].device_kind} x{jax.device_count()} "
             f"({os.cpu_count()} CPU cores visible); total wall time {wall / 60:.1f} min "
             "(this invocation, including compilation; runs reused from earlier invocations "
             "count 0).",
             "Numbers are single-seed measurements at toy scale: read differences smaller than "
             "a few hundredths of a nat as noise."]
    if failures:
        lines.append("Failed runs: " + "; ".join(f"{f['name']}: {f['error']}" for f in failures))
    return "\n\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--configs", nargs="*", help="experiments/<file>.py:<arg> specs")
    parser.add_argument("--runs", nargs="*", default=[], help="finished run dirs to include")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--only", help="comma-separated groups of the preset to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override applied to every run, e.g. train.steps=100 (the "
                             "same as ttt.main's --config.train.steps=100)")
    parser.add_argument("--force", action="store_true", help="retrain finished runs")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs trained at once in worker processes (default: the preset's, "
                             "else 1)")
    args = parser.parse_args(argv)
    args.argv = argv  # the report header records the command as given
    if not (args.preset or args.configs or args.runs):
        parser.error("give --preset, --configs or --runs")

    from experiments.report import build_report, summarize

    start = time.perf_counter()
    try:
        entries = _entries(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {cli.one_line(err)}", file=sys.stderr)
        return 2
    jobs, alone = PRESET_JOBS.get(args.preset, (1, ()))
    jobs = args.jobs or jobs
    serial = [e for e in entries if jobs == 1 or e[0] in alone]
    pooled = [e for e in entries if e not in serial]
    infos = {}
    for i, (group, name, spec) in enumerate(serial):
        print(f"\n[{i + 1}/{len(entries)}] {group}/{name}  ({spec})  "
              f"{(time.perf_counter() - start) / 60:.1f} min elapsed", file=sys.stderr, flush=True)
        infos[(group, name)] = run_one(group, name, spec, os.path.join(args.workdir, group, name),
                                       args.overrides, args.force)
    if pooled:
        infos.update(_run_pool(pooled, args, jobs, len(serial), len(entries), start))
    dirs, failures = [], []
    for group, name, _ in entries:
        if "error" in infos[(group, name)]:
            failures.append(infos[(group, name)])
        run_dir = os.path.join(args.workdir, group, name)
        if os.path.exists(os.path.join(run_dir, "config.json")):
            dirs.append(run_dir)
    dirs += args.runs
    summaries = [summarize(d) for d in dirs]
    text = build_report(summaries, args.workdir,
                        header=_header(args, time.perf_counter() - start, failures))
    print("\n" + text)
    print(f"report: {os.path.join(args.workdir, 'report.md')}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as err:
        print(f"\nstopped ({err or 'interrupted'}); run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
