r"""Continue a prompt with a trained language-model run.

  python -m ttt.sample --workdir=/tmp/lm --prompt="def main(" [--max_tokens=200] \
      [--temperature=0.8] [--top_k=40] [--seed=0] [--step=N]

Prints the continuation (not the prompt) on stdout. --temperature=0 decodes greedily; --top_k=0
samples from the whole vocabulary. The prompt is tokenized with the run's own tokenizer
(`data.tokenizer`: bytes, or its SentencePiece file); decoding is the model's prefill + one `step`
per token (`ttt.models.generate`), so a TTT layer carries its fixed-size state, not a KV cache.
The text is written as it is generated (`ttt.models.generate_chunks`, 256 tokens at a time); when
stdout is not a terminal, a progress bar on stderr follows long generations. Exit status 2 with
one line on stderr for a bad flag (a temperature that is not a finite number >= 0, a negative
top_k, a prompt that is not UTF-8 text, more tokens than the model can reach: a softmax KV cache's
cache_size, or 2^31 - 1 positions), a run that is not a text LM, or a config.json that is not a
run's.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator

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
CHUNK = 256  # tokens per jitted decode call: the text appears this many tokens at a time
MAX_POSITIONS = 2**31 - 1  # decode positions are int32


def check_flags(max_tokens: int, temperature: float, top_k: int, prompt: str = "") -> None:
    """UsageError for a sampling value outside its domain or a prompt that is not UTF-8 text
    (before anything is loaded)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable argv bytes arrive as lone surrogates
        raw = prompt.encode("utf-8", "surrogateescape")
        raise cli.UsageError(f"--prompt: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                             f"position {err.start}); pass the prompt as UTF-8") from None
    if max_tokens < 1:
        raise cli.UsageError(f"--max_tokens={max_tokens}: must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise cli.UsageError(f"--temperature={temperature}: must be >= 0 and finite "
                             "(0 = greedy)")
    if top_k < 0:
        raise cli.UsageError(f"--top_k={top_k}: must be >= 0 (0 = no top-k)")


def prompt_ids(tok, prompt: str) -> list[int]:
    """The prompt's token ids; UsageError for an empty prompt."""
    ids = [int(i) for i in tok.encode(prompt)]
    if not ids:
        raise cli.UsageError("--prompt is empty: give at least one character to continue")
    return ids


class TextStream:
    """Token ids in, text out as soon as it is complete: a piece is emitted once it no longer
    ends in a partial character (U+FFFD), decoded together with the previous piece so that
    tokenizers whose pieces depend on their neighbours (SentencePiece spaces) join correctly."""

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def add(self, ids) -> str:
        self.ids.extend(int(i) for i in ids)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


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
    return "".join(sample_stream(workdir, prompt, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k, seed=seed, step=step))


def sample_stream(workdir: str, prompt: str, *, max_tokens: int = 200, temperature: float = 1.0,
                  top_k: int = 0, seed: int = 0, step: int | None = None,
                  progress: bool = False) -> Iterator[str]:
    """`sample`'s text, piece by piece as it is generated; `progress`: a bar on stderr."""
    # imported here: the command line answers --help and bad flags before JAX starts
    import jax
    from tqdm import tqdm

    from ttt.data.tokenizers import make_tokenizer
    from ttt.models.generate import generate_chunks
    from ttt.run import load

    check_flags(max_tokens, temperature, top_k, prompt)
    run = load(workdir, step)
    config = run.config
    if config.model.kind != "lm" or config.data.name not in TEXT_DATA:
        raise ConfigError(f"--workdir={workdir}: a {config.model.kind} run on data.name="
                          f"{config.data.name!r}; sampling needs a language model trained on text "
                          f"({', '.join(TEXT_DATA)})")
    tok = make_tokenizer(config.data.get("tokenizer", "byte"))
    ids = prompt_ids(tok, prompt)
    if top_k > int(config.model.vocab_size):
        raise cli.UsageError(f"--top_k={top_k}: larger than the vocabulary "
                             f"({config.model.vocab_size})")
    cache = _kv_cache_size(run.model)
    if cache is not None and len(ids) + max_tokens > cache:
        raise cli.UsageError(
            f"--max_tokens={max_tokens}: the prompt ({len(ids)} tokens) plus the continuation "
            f"exceed the {config.model.mixer} KV cache of {cache} tokens (mixer_kwargs.cache_size)"
            "; lower --max_tokens or shorten the prompt")
    if len(ids) + max_tokens > MAX_POSITIONS:
        raise cli.UsageError(f"--max_tokens={max_tokens}: the prompt ({len(ids)} tokens) plus the "
                             f"continuation exceed the {MAX_POSITIONS} positions a decode counts")
    chunks = generate_chunks(run.model, {"params": run.params}, [ids], max_tokens,
                             key=jax.random.PRNGKey(seed), temperature=max(temperature, 1e-6),
                             top_k=top_k or None, greedy=temperature == 0, chunk=CHUNK)
    stream = TextStream(tok)
    with tqdm(total=max_tokens, unit="token", disable=not progress, leave=False,
              file=sys.stderr) as bar:
        for new in chunks:
            new = jax.device_get(new)[0]
            bar.update(len(new))
            text = stream.add(new)
            if text:
                yield text
    yield stream.flush()


def _main(argv: list[str]) -> int:
    values, _ = cli.parse_flags(argv, FLAGS, prog="python -m ttt.sample", doc=__doc__)
    check_flags(values["max_tokens"], values["temperature"], values["top_k"], values["prompt"])
    start = time.perf_counter()
    long = values["max_tokens"] > 4 * CHUNK and not sys.stdout.isatty()
    for text in sample_stream(values["workdir"], values["prompt"],
                              max_tokens=values["max_tokens"], temperature=values["temperature"],
                              top_k=values["top_k"], seed=values["seed"], step=values["step"],
                              progress=long):
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"({values['max_tokens']} tokens from {values['workdir']} in "
          f"{time.perf_counter() - start:.1f} s, compilation included)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The `python -m ttt.sample` entry point; returns the exit status."""
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
