"""Where a mixer's forward+backward time goes: one `jax.profiler` trace, attributed to source lines.

    python -m experiments.profile ttt_linear [--n 2048] [--batch 1] [--by line|function]
                                  [--runs 2] [--top 30] [--out FILE.md]

The label is one of the benchmark's (`experiments.bench.LABELS`: a registry mixer and overrides),
built at the benchmark's layer shape and run as its forward+backward (a fixed random cotangent).
The jitted step is compiled, called once to warm up, then traced for `--runs` calls. Every event
of the trace whose name is an instruction of the compiled HLO (XLA:CPU's thunks; GPU kernels that
keep their fusion's name) is charged to the project source line it came from, read from the HLO's
stack frames: the innermost frame in `ttt/`, with the outermost one after "<" when they differ.
A fusion takes the most common frame among its fused instructions; one without any (XLA:CPU's
library matmul fusions carry none) the frame of the loop or call around it, else that of its
first input, named with its shape; control flow (while, call, conditional) is not counted
itself, only what runs inside.

Thunks run concurrently on the CPU's threads, so the "thunk ms" sum can exceed the wall time and
a shared share of the cores slows each thunk: compare shares within one run, not across runs.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
import time

import jax

from experiments import bench

CONTROL = ("while", "call", "conditional")
TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def parse_hlo(text: str) -> dict:
    """The compiled HLO text -> its stack-frame tables and, per instruction, what to charge it to.

    Returns {"frames": {id: (file, function, line, parent id)}, "frame": {instruction: frame id or
    None}, "fused": {instruction: called computation}, "owner": {computation: calling
    instruction}, "instructions": {computation: [names]}, "comp": {instruction: its
    computation}, "operands": {instruction: [names]}, "kind": {instruction: "op shape"}}.
    """
    sections = {t: {} for t in TABLES}
    out = {key: {} for key in ("frame", "fused", "owner", "instructions", "kind", "comp",
                                "operands")}
    table, comp = None, None
    for line in text.splitlines():
        if line in TABLES:
            table = line
            continue
        row = re.match(r"^(\d+) (.*)$", line) if table else None
        if row:
            sections[table][int(row.group(1))] = row.group(2)
            continue
        table = None
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            comp = head.group(1)
            out["instructions"][comp] = []
            continue
        inst = re.match(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(", line)
        if not inst or comp is None:
            continue
        name, shape, op = inst.groups()
        args = line[inst.end():].split(")", 1)[0]
        out["operands"][name] = re.findall(r"%([\w.\-]+)", args)
        out["instructions"][comp].append(name)
        out["comp"][name] = comp
        sf = re.search(r"stack_frame_id=(\d+)", line)
        out["frame"][name] = int(sf.group(1)) if sf else None
        out["kind"][name] = f"{op} {re.sub(r'{[^}]*}|/[*].*?[*]/', '', shape)}"
        for called in re.findall(r"(?:calls|body|condition|to_apply|branch_computations)="
                                 r"\{?%([\w.\-]+)", line):
            out["owner"].setdefault(called, name)
            if op == "fusion":
                out["fused"][name] = called
    nums = lambda s: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", s)}
    files = {i: s.strip('"') for i, s in sections["FileNames"].items()}
    funcs = {i: s.strip('"') for i, s in sections["FunctionNames"].items()}
    locs = {i: nums(s) for i, s in sections["FileLocations"].items()}
    out["frames"] = {}
    for i, s in sections["StackFrames"].items():
        f = nums(s)
        loc = locs[f["file_location_id"]]
        out["frames"][i] = (files[loc["file_name_id"]], funcs[loc["function_name_id"]],
                            loc["line"], f.get("parent_frame_id", 0))
    return out


def _stack(hlo: dict, fid):
    """Frames innermost first, as (file, function, line)."""
    out, seen = [], set()
    while fid and fid in hlo["frames"] and fid not in seen:
        seen.add(fid)
        file, fn, line, parent = hlo["frames"][fid]
        out.append((file, fn, line))
        fid = parent
    return out


def _label(stack, keep: str, by: str) -> str | None:
    ours = [s for s in stack if keep in s[0]]
    if not ours:
        return None
    fmt = (lambda s: f"{s[0].split(keep)[-1]}:{s[2]} {s[1]}") if by == "line" else \
        (lambda s: f"{s[0].split(keep)[-1]} {s[1]}")
    inner, outer = fmt(ours[0]), fmt(ours[-1])
    return inner if inner == outer else f"{inner} < {outer}"


def charge(hlo: dict, name: str, keep: str = "ttt/", by: str = "line") -> str:
    """The source label an instruction's time goes to (module docstring)."""
    fid = hlo["frame"].get(name)
    if fid is None and name in hlo["fused"]:
        ids = [hlo["frame"][i] for i in hlo["instructions"].get(hlo["fused"][name], [])
               if hlo["frame"].get(i) is not None]
        fid = collections.Counter(ids).most_common(1)[0][0] if ids else None
    label = _label(_stack(hlo, fid), keep, by) if fid is not None else None
    if label is not None:
        return label
    outer = hlo["owner"].get(hlo["comp"].get(name))
    seen = set()
    while outer is not None and outer not in seen:  # up through fusions, loops and calls
        seen.add(outer)
        if hlo["frame"].get(outer) is not None:
            label = _label(_stack(hlo, hlo["frame"][outer]), keep, by)
            if label is not None:
                return f"{label} [{hlo['kind'].get(name, name)}]"
        outer = hlo["owner"].get(hlo["comp"].get(outer))
    for arg in hlo["operands"].get(name, []):  # last resort: what it reads
        if hlo["frame"].get(arg) is not None or arg in hlo["fused"]:
            label = charge(hlo, arg, keep, by)
            if not label.startswith("(no source)"):
                return f"{label.split(' [')[0]} [{hlo['kind'].get(name, name)}, its input]"
    return f"(no source) {hlo['kind'].get(name, name)}"


def profile(fn, *args, runs: int = 2, keep: str = "ttt/", by: str = "line") -> dict:
    """Trace `runs` calls of the compiled jax.jit(fn)(*args) after a warm-up; per label: thunk
    seconds per call and events per call. Returns {"wall_s", "thunk_s", "rows": [(label,
    seconds, count)]}."""
    compiled = jax.jit(fn).lower(*args).compile()  # one executable: its HLO is what runs
    hlo = parse_hlo(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        t0 = time.perf_counter()
        for _ in range(runs):
            jax.block_until_ready(compiled(*args))
        wall = (time.perf_counter() - t0) / runs
        jax.profiler.stop_trace()
        traces = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))
        data = jax.profiler.ProfileData.from_file(traces[-1])
        seconds, count, labels = collections.Counter(), collections.Counter(), {}
        for plane in data.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name not in hlo["frame"] or hlo["kind"][ev.name].startswith(CONTROL):
                        continue
                    if ev.name not in labels:
                        labels[ev.name] = charge(hlo, ev.name, keep, by)
                    label = labels[ev.name]
                    seconds[label] += ev.duration_ns / 1e9 / runs
                    count[label] += 1 / runs
    rows = sorted(((k, seconds[k], count[k]) for k in seconds), key=lambda r: -r[1])
    return {"wall_s": wall, "thunk_s": sum(seconds.values()), "rows": rows}


def table(result: dict, top: int, title: str) -> str:
    """Markdown: the `top` labels by time, the rest summed."""
    total = result["thunk_s"] or 1.0
    lines = [f"{title}: wall {result['wall_s'] * 1e3:.1f} ms per call, thunk time "
             f"{result['thunk_s'] * 1e3:.1f} ms (summed over threads)", "",
             "| thunk ms | share | events | where |", "|---:|---:|---:|---|"]
    rows = result["rows"]
    for label, s, n in rows[:top]:
        lines.append(f"| {s * 1e3:.1f} | {100 * s / total:.1f} % | {n:.0f} | "
                     f"{label.replace('|', '/')} |")
    rest = rows[top:]
    if rest:
        s = sum(r[1] for r in rest)
        lines.append(f"| {s * 1e3:.1f} | {100 * s / total:.1f} % | {sum(r[2] for r in rest):.0f} "
                     f"| {len(rest)} other labels |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("label", help=f"one of {', '.join(bench.LABELS)}")
    parser.add_argument("--n", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--width", type=int, default=bench.WIDTH)
    parser.add_argument("--heads", type=int, default=bench.HEADS)
    parser.add_argument("--by", choices=("line", "function"), default="line")
    parser.add_argument("--runs", type=int, default=2, help="traced calls (default 2)")
    parser.add_argument("--top", type=int, default=30, help="rows shown (default 30)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.label not in bench.LABELS:
        parser.error(f"unknown label {args.label!r}; known: {', '.join(bench.LABELS)}")
    for flag in ("n", "batch", "width", "heads", "runs", "top"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.width % args.heads:
        parser.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if bench.gpu_only(args.label):
        parser.error(f"{args.label}: {bench.gpu_only(args.label)}")
    module, params, x, ct = bench._setup(args.label, args.n, args.width, args.heads, args.batch)
    def train(p, x, ct):  # the backward of a fixed random cotangent, as the benchmark's
        y, pullback = jax.vjp(lambda p, x: module.apply(p, x)[0], p, x)
        return pullback(ct.astype(y.dtype))

    result = profile(train, params, x, ct, runs=args.runs, by=args.by)
    text = table(result, args.top, f"{args.label} fwd+bwd, N={args.n}, batch {args.batch}, "
                 f"width {args.width}, {args.heads} heads, {jax.default_backend()}")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
