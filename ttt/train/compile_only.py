"""Compile a config's train step without allocating its parameters, and report what it costs and
how it is sharded.

  python -m ttt.main --config experiments/lm.py:ttt_linear,1.3b,ctx=8k,paper --compile_only \
      --simulate_devices 8 --workdir DIR [--strict] [--config.train.mesh.model=2]
  python -m ttt.train.compile_only --config experiments/lm.py:softmax,125m,ctx=2k,paper

The train state is built with `jax.eval_shape` (ShapeDtypeStructs only), the batch is abstract, and
the jitted step is lowered for the configured placement (single device, or the device mesh with
sharded parameters) and compiled by XLA. Nothing of the model's size is ever allocated, so a
1.3B-parameter config compiles on a laptop CPU; `--simulate_devices N` (ttt.main) gives it N CPU
devices to shard over. The data pipeline is not opened when the config names the model's
vocabulary / image fields itself (paper configs do), so absent datasets are fine.

Reported (and written to DIR/compile_report.json with --workdir):
- `per_device`: `params_bytes` and `opt_state_bytes` (each leaf's shard under the placement's
  sharding), and from XLA's memory analysis of the compiled step `temp_bytes` and `total_bytes`
  (arguments + outputs - donated aliases + temporaries: the step's peak footprint per device);
- `collectives`: for each collective kind in the compiled HLO (all-reduce, all-gather,
  reduce-scatter, all-to-all, collective-permute) its count and the bytes of its results, per
  device. Counts are static: an op inside a loop body (the scan over layers, the TTT mini-batch
  scan) counts once however often the loop runs;
- `warnings`: every warning XLA printed while compiling (e.g. "[SPMD] Involuntary full
  rematerialization": a layout change it could only make by replicating a tensor). `--strict`
  makes any warning exit with status 2;
- parameters, FLOPs of one step from XLA's cost analysis (a lower bound: loop bodies count once);
- `layers` (LM): for each position of the layer pattern (one row unless the stack is hybrid) its
  mixer, how many layers run it, its parameters and recurrent state per layer and sequence.
`lower_only=True` skips XLA compilation (seconds instead of minutes on a CPU) and reports the FLOPs
of the unoptimised HLO, without memory, collectives or warnings.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

from ttt import cli
from ttt.config import ConfigError, validate, with_defaults
from ttt.files import write_json_atomic
from ttt.models import build_model, param_count
from ttt.models.hybrid import layer_table
from ttt.train.setup import (
    abstract_meta,
    abstract_state,
    build_setup,
    lower_train_step,
    resolve_config,
)
from ttt.train.workdir import prepare_workdir

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
# '%all-gather.3 = f32[8,64]{1,0} all-gather(...)', '... = (f32[..], f32[..]) all-reduce(...)',
# async pairs '... all-gather-start(...)' (the '-done' half is not counted again)
_COLLECTIVE_LINE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|\S+)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations)="
                     r"(\{[^}]*\}|%[\w.\-]+)")
_XLA_WARNING = re.compile(r"^[WE]\d{4} [\d:.]+\s+\d+ \S+\] (?P<text>.*)$")


def _first(analysis):
    """cost_analysis() is a dict, or a list with one dict per computation on some versions."""
    if isinstance(analysis, (list, tuple)):
        return analysis[0] if analysis else {}
    return analysis or {}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes", "in_loops"}} of the collectives in compiled HLO text (see the
    module doc); bytes are those of each op's result on one device (for an async start: its last
    element); in_loops counts the ops inside a while-loop body (run once per iteration: per layer
    of a scanned stack, per mini-batch of the TTT scan)."""
    out = {kind: {"count": 0, "bytes": 0, "in_loops": 0} for kind in COLLECTIVES}
    found, calls, bodies, comp = [], {}, set(), None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp = head["name"]
            continue
        for key, names in _CALLEE.findall(line):
            callees = re.findall(r"%([\w.\-]+)", names)
            calls.setdefault(comp, set()).update(callees)
            if key == "body":
                bodies.update(callees)
        m = _COLLECTIVE_LINE.search(line)
        if m is None:
            continue
        arrays = _ARRAY.findall(m["shape"])
        if m["start"] and len(arrays) > 1:
            arrays = arrays[-1:]  # (operand, result) of an async start: the result
        size = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                   for dtype, dims in arrays)
        found.append((m["op"], size, comp))
    looped, todo = set(), list(bodies)
    while todo:  # every computation a loop body calls, transitively
        name = todo.pop()
        if name not in looped:
            looped.add(name)
            todo.extend(calls.get(name, ()))
    for op, size, where in found:
        out[op]["count"] += 1
        out[op]["bytes"] += size
        out[op]["in_loops"] += where in looped
    return out


def xla_warnings(text: str) -> list[str]:
    """The warning and error lines of XLA's log in `text`, without their log prefix."""
    found = []
    for line in text.splitlines():
        m = _XLA_WARNING.match(line.strip())
        if m:
            found.append(m["text"].strip())
    return found


@contextlib.contextmanager
def _captured_stderr():
    """Everything written to file descriptor 2 meanwhile (XLA logs from C++, not through Python)
    goes to the list this yields (one string), and is passed on to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    out = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            out.append(text)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


def _shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs with shardings)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return total


def compile_report(config, *, lower_only: bool = False) -> dict:
    """Lower (and compile) the train step of `config` on abstract inputs.

    Returns {"params", "devices", "parallel", "mesh" (axis sizes, mesh placement), "flops",
    "lower_s", "compile_s", "per_device": {"params_bytes", "opt_state_bytes", "temp_bytes",
    "total_bytes"}, "memory": XLA's {"argument", "output", "alias", "temp", "generated_code"}
    bytes, "collectives": {kind: {"count", "bytes"}}, "warnings": [str]}; without compilation
    (`lower_only`) only params, devices, parallel, mesh, flops and lower_s.
    """
    validate(config)
    if config.train.parallel == "pmap":
        raise ConfigError("config.train.parallel='pmap': compile_only reports the 'single' and "
                          "'mesh' placements; pass --config.train.parallel=mesh")
    config = resolve_config(config, abstract_meta(config))
    setup = build_setup(config, abstract_meta(config), build_model)
    abstract = abstract_state(setup)
    placed = setup.placement.restore_target(abstract)
    out = {"params": param_count(abstract.params), "devices": jax.device_count(),
           "parallel": config.train.parallel}
    if setup.placement.mode == "mesh":
        out["mesh"] = {k: int(v) for k, v in setup.placement.mesh.shape.items()}
    if config.model.kind == "lm":  # each position of the layer pattern: params and state
        out["layers"] = layer_table(setup.task.model, abstract.params, int(config.data.seq_len))
    t = time.perf_counter()
    lowered = lower_train_step(setup)
    out["lower_s"] = time.perf_counter() - t
    if lower_only:
        out["flops"] = float(_first(lowered.cost_analysis()).get("flops", float("nan")))
        return out
    t = time.perf_counter()
    with _captured_stderr() as log:
        compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t
    out["warnings"] = xla_warnings(log[0])
    out["flops"] = float(_first(compiled.cost_analysis()).get("flops", float("nan")))
    mem = compiled.memory_analysis()
    memory = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) if mem is not None else 0
              for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["memory"] = memory
    out["per_device"] = {
        "params_bytes": _shard_bytes(placed.params),
        "opt_state_bytes": _shard_bytes(placed.opt_state),
        "temp_bytes": memory["temp"],
        "total_bytes": memory["argument"] + memory["output"] - memory["alias"] + memory["temp"],
    }
    out["collectives"] = collectives(compiled.as_text())
    return out


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def format_report(report: dict) -> str:
    """Human-readable lines (tables) for `compile_report`'s dict."""
    where = f"{report['parallel']} over {report['devices']} device(s)"
    if "mesh" in report:
        where += " (" + ", ".join(f"{k} {v}" for k, v in report["mesh"].items()) + ")"
    lines = [f"parameters: {report['params']:,}", f"placement: {where}",
             f"FLOPs per train step (XLA cost analysis): {report['flops']:.4g}  [a lower "
             "bound: XLA counts a while-loop body once, so scanned layers and the TTT "
             "mini-batch scan count once]",
             f"lowering: {report['lower_s']:.1f} s"]
    lines[1:1] = [f"  {row['layers']} x {row['mixer']}: {row['params']:,} parameters and "
                  f"{row['state']:,} floats of recurrent state per layer and sequence"
                  for row in report.get("layers", ())]
    if "per_device" not in report:
        return "\n".join(lines)
    pd = report["per_device"]
    lines += [f"compilation: {report['compile_s']:.1f} s", "",
              "per-device memory (XLA memory analysis of the compiled step)",
              f"  {'params':<10} {_size(pd['params_bytes']):>12}",
              f"  {'opt_state':<10} {_size(pd['opt_state_bytes']):>12}",
              f"  {'temp':<10} {_size(pd['temp_bytes']):>12}",
              f"  {'total':<10} {_size(pd['total_bytes']):>12}   (arguments + outputs - "
              "donated + temporaries)", "",
              "collectives in the compiled step (per device; an op in a loop body counts once;"
              " 'in loops': those run every iteration)",
              f"  {'kind':<20} {'count':>6} {'bytes':>12} {'in loops':>9}"]
    for kind, c in report["collectives"].items():
        lines.append(f"  {kind:<20} {c['count']:>6} {_size(c['bytes']):>12} "
                     f"{c['in_loops']:>9}")
    warnings = report["warnings"]
    lines += ["", f"XLA warnings while compiling: {len(warnings) or 'none'}"]
    lines += [f"  - {w[:300]}" for w in warnings]
    return "\n".join(lines)


def run(config, *, lower_only: bool = False, workdir: str | None = None,
        strict: bool = False) -> dict:
    """Compile, print the report, write `workdir/compile_report.json`, return the report (the
    `--compile_only` entry point). `strict`: ConfigError (exit 2) if XLA printed any warning."""
    if workdir:
        workdir = prepare_workdir(workdir)
    report = compile_report(config, lower_only=lower_only)
    print(format_report(report))
    if workdir:
        path = os.path.join(workdir, "compile_report.json")
        write_json_atomic(path, report, indent=1)  # whole or not at all
        print(f"report: {path}")
    if strict and report.get("warnings"):
        raise ConfigError(f"--strict: XLA printed {len(report['warnings'])} warning(s) while "
                          f"compiling, first: {report['warnings'][0][:200]}")
    return report


def _main(argv: list[str]) -> int:
    flags = (cli.Flag("lower_only", bool, False, "skip XLA compilation (no memory analysis)"),
             cli.Flag("workdir", str, None, "write compile_report.json here"),
             cli.Flag("strict", bool, False, "exit 2 if XLA printed any warning"),
             cli.DEBUG)
    values, overrides = cli.parse_flags(argv, flags, prog="python -m ttt.train.compile_only",
                                        doc=__doc__, config=True)
    config = cli.apply_overrides(with_defaults(cli.load_config(values["config"])), overrides)
    run(config, lower_only=values["lower_only"], workdir=values["workdir"],
        strict=values["strict"])
    return 0


def main(argv=None) -> int:
    """`python -m ttt.train.compile_only --config=FILE:ARG [--config.<key>=...] [--lower_only]
    [--workdir DIR] [--strict]`; returns the exit status (2 with one line on stderr for bad input
    or, with --strict, an XLA warning)."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
