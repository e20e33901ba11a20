"""Compile a config's train step without allocating its parameters, and report its cost.

  python -m ttt.main --config experiments/lm.py:ttt_linear,1.3b,ctx=8k,paper --compile_only \
      [--config.train.mesh.fsdp=1]
  python -m ttt.train.compile_only --config experiments/lm.py:softmax,125m,ctx=2k,paper

The train state is built with `jax.eval_shape` (ShapeDtypeStructs only), the batch is abstract, and
the jitted step is lowered for the configured placement (single device, or the device mesh with
sharded parameters) and compiled by XLA. Nothing of the model's size is ever allocated, so a
1.3B-parameter config compiles on a laptop CPU. The data pipeline is not opened when the config
names the model's vocabulary / image fields itself (paper configs do), so absent datasets are fine.

Reported: parameter count, XLA's per-device memory analysis (arguments, outputs, temporaries) and
the FLOPs of one step from XLA's cost analysis. `lower_only=True` skips XLA compilation (seconds
instead of minutes on a CPU) and reports the FLOPs of the unoptimised HLO, without memory.
"""

from __future__ import annotations

import sys
import time

import jax

from ttt.config import ConfigError, validate
from ttt.models import param_count


def abstract_meta(config) -> dict:
    """The dataset meta the model needs, from the data pipeline if it opens, else the config."""
    model, data = config.model, config.data
    if model.kind == "lm" and model.get("vocab_size") and data.get("seq_len"):
        return {"vocab_size": int(model.vocab_size), "seq_len": int(data.seq_len)}
    if model.kind == "vit" and model.get("num_classes") and model.get("image_size") and \
            model.get("channels"):
        s = int(model.image_size)
        return {"num_classes": int(model.num_classes), "image_shape": (s, s, int(model.channels))}
    from ttt.data import meta

    try:
        return meta(data)
    except Exception as err:
        raise ConfigError(f"config.data: {err} (compile_only needs the dataset's meta; set "
                          "config.model.vocab_size / num_classes, image_size, channels to skip "
                          "the data)") from err


def _first(analysis):
    """cost_analysis() is a dict, or a list with one dict per computation on some versions."""
    if isinstance(analysis, (list, tuple)):
        return analysis[0] if analysis else {}
    return analysis or {}


def compile_report(config, *, lower_only: bool = False) -> dict:
    """Lower (and compile) the train step of `config` on abstract inputs.

    Returns {"params", "flops", "lower_s", "compile_s", "memory": {"argument_bytes",
    "output_bytes", "temp_bytes", "generated_code_bytes"} (per device; absent with lower_only),
    "devices", "parallel"}.
    """
    from ttt.models import build_model
    from ttt.train.train import abstract_state, build_setup, lower_train_step, resolve_config

    validate(config)
    config = resolve_config(config, abstract_meta(config))
    setup = build_setup(config, abstract_meta(config), build_model)
    out = {"params": param_count(abstract_state(setup).params),
           "devices": jax.device_count(), "parallel": config.train.parallel}
    t = time.perf_counter()
    lowered = lower_train_step(setup)
    out["lower_s"] = time.perf_counter() - t
    if lower_only:
        out["flops"] = float(_first(lowered.cost_analysis()).get("flops", float("nan")))
        return out
    t = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t
    out["flops"] = float(_first(compiled.cost_analysis()).get("flops", float("nan")))
    mem = compiled.memory_analysis()
    if mem is not None:
        out["memory"] = {k: int(getattr(mem, f"{k}_size_in_bytes", 0)) for k in
                         ("argument", "output", "temp", "generated_code")}
    return out


def format_report(report: dict) -> str:
    """Human-readable lines for `compile_report`'s dict."""
    gib = 2.0**30
    lines = [f"parameters: {report['params']:,}",
             f"placement: {report['parallel']} over {report['devices']} device(s)",
             f"FLOPs per train step (XLA cost analysis): {report['flops']:.4g}  [a lower "
             "bound: XLA counts a while-loop body once, so scanned layers and the TTT "
             "mini-batch scan count once]",
             f"lowering: {report['lower_s']:.1f} s"]
    if "memory" in report:
        m = report["memory"]
        total = m["argument"] + m["output"] + m["temp"]
        lines += [f"compilation: {report['compile_s']:.1f} s",
                  f"per-device memory: {total / gib:.3f} GiB (arguments {m['argument'] / gib:.3f}"
                  f", outputs {m['output'] / gib:.3f}, temporaries {m['temp'] / gib:.3f} GiB)"]
    return "\n".join(lines)


def run(config, *, lower_only: bool = False) -> dict:
    """Compile, print the report, return it (the `--compile_only` entry point)."""
    report = compile_report(config, lower_only=lower_only)
    print(format_report(report))
    return report


def _main(argv: list[str]) -> int:
    from ttt import cli
    from ttt.config import with_defaults

    flags = (cli.Flag("lower_only", bool, False, "skip XLA compilation (no memory analysis)"),
             cli.DEBUG)
    values, overrides = cli.parse_flags(argv, flags, prog="python -m ttt.train.compile_only",
                                        doc=__doc__, config=True)
    config = cli.apply_overrides(with_defaults(cli.load_config(values["config"])), overrides)
    run(config, lower_only=values["lower_only"])
    return 0


def main(argv=None) -> int:
    """`python -m ttt.train.compile_only --config=FILE:ARG [--config.<key>=...] [--lower_only]`;
    returns the exit status (2 with one line on stderr for bad input)."""
    from ttt import cli

    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
