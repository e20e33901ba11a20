r"""Continue a prompt with a trained language-model run.

  python -m ttt.sample --workdir=/tmp/lm --prompt="def main(" [--max_tokens=200] \
      [--temperature=0.8] [--top_k=40] [--seed=0] [--step=N]

Prints the continuation (not the prompt) on stdout. --temperature=0 decodes greedily; --top_k=0
samples from the whole vocabulary. The prompt is tokenized with the run's own tokenizer
(`data.tokenizer`: bytes, or its SentencePiece file); decoding is the model's prefill + one `step`
per token (`ttt.models.generate`), so a TTT layer carries its fixed-size state, not a KV cache.
Exit status 2 with one line on stderr for a bad flag, a run that is not a text LM, or a prompt that
does not fit.
"""

from __future__ import annotations

import sys
import time

from ttt import cli
from ttt.config import ConfigError

FLAGS = (
    cli.Flag("workdir", str, None, "a run directory written by python -m ttt.main", True),
    cli.Flag("prompt", str, None, "the text to continue", True),
    cli.Flag("max_tokens", int, 200, "tokens to generate"),
    cli.Flag("temperature", float, 1.0, "softmax temperature; 0 = greedy"),
    cli.Flag("top_k", int, 0, "sample among the k most likely tokens; 0 = all"),
    cli.Flag("seed", int, 0, "PRNG seed of the sampling"),
    cli.Flag("step", int, None, "checkpoint step to load (default: the newest)"),
    cli.DEBUG,
)
TEXT_DATA = ("text_corpus", "text_files", "tfds_text")


def _kv_cache_size(model) -> int | None:
    """Tokens the mixers' decode caches hold (softmax attention; the smallest over a hybrid's
    layers), None when they have no limit."""
    from ttt import layers  # imported here, as below: bad flags fail before JAX starts
    from ttt.models.hybrid import layer_mixers

    sizes = [getattr(layers.make_mixer(layer.mixer, model.width, model.num_heads,
                                       **dict(layer.mixer_kwargs)), "cache_size", None)
             for layer in layer_mixers(model)]
    sizes = [s for s in sizes if s is not None]
    return min(sizes) if sizes else None


def sample(workdir: str, prompt: str, *, max_tokens: int = 200, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0, step: int | None = None) -> str:
    """The continuation of `prompt` by the run in `workdir` (see the module doc)."""
    # imported here: the command line answers --help and bad flags before JAX starts
    import jax

    from ttt.data.tokenizers import make_tokenizer
    from ttt.models import generate
    from ttt.run import load

    if max_tokens < 1:
        raise cli.UsageError(f"--max_tokens={max_tokens}: must be at least 1")
    if temperature < 0:
        raise cli.UsageError(f"--temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise cli.UsageError(f"--top_k={top_k}: must be >= 0 (0 = no top-k)")
    run = load(workdir, step)
    config = run.config
    if config.model.kind != "lm" or config.data.name not in TEXT_DATA:
        raise ConfigError(f"--workdir={workdir}: a {config.model.kind} run on data.name="
                          f"{config.data.name!r}; sampling needs a language model trained on text "
                          f"({', '.join(TEXT_DATA)})")
    tok = make_tokenizer(config.data.get("tokenizer", "byte"))
    ids = [int(i) for i in tok.encode(prompt)]
    if not ids:
        raise cli.UsageError("--prompt is empty: give at least one character to continue")
    if top_k > int(config.model.vocab_size):
        raise cli.UsageError(f"--top_k={top_k}: larger than the vocabulary "
                             f"({config.model.vocab_size})")
    cache = _kv_cache_size(run.model)
    if cache is not None and len(ids) + max_tokens > cache:
        raise cli.UsageError(
            f"--max_tokens={max_tokens}: the prompt ({len(ids)} tokens) plus the continuation "
            f"exceed the {config.model.mixer} KV cache of {cache} tokens (mixer_kwargs.cache_size)"
            "; lower --max_tokens or shorten the prompt")
    out = generate(run.model, {"params": run.params}, [ids], max_tokens,
                   key=jax.random.PRNGKey(seed), temperature=max(temperature, 1e-6),
                   top_k=top_k or None, greedy=temperature == 0)
    return tok.decode(jax.device_get(out)[0, len(ids):])


def _main(argv: list[str]) -> int:
    values, _ = cli.parse_flags(argv, FLAGS, prog="python -m ttt.sample", doc=__doc__)
    start = time.perf_counter()
    text = sample(values["workdir"], values["prompt"], max_tokens=values["max_tokens"],
                  temperature=values["temperature"], top_k=values["top_k"], seed=values["seed"],
                  step=values["step"])
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    print(f"({values['max_tokens']} tokens from {values['workdir']} in "
          f"{time.perf_counter() - start:.1f} s, compilation included)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The `python -m ttt.sample` entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
