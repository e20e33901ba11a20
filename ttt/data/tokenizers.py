"""Tokenizers for the language-modelling pipelines.

- `ByteTokenizer` (default): UTF-8 bytes 0..255 plus an end-of-document token 256, so the
  vocabulary is 257 and nothing needs downloading.
- `SentencePieceTokenizer`: any SentencePiece `.model` file (e.g. the Llama-2 tokenizer used by
  the TTT papers); its own EOS id ends each document.
"""

from __future__ import annotations

import os

import numpy as np

from ttt.data.errors import DataConfigError


class ByteTokenizer:
    """UTF-8 bytes as tokens; id 256 is EOS (also used as padding, always under mask 0)."""

    vocab_size = 257
    eos_id = 256
    name = "byte"

    def encode(self, text: str | bytes) -> np.ndarray:
        """text -> (n,) int32 token ids (no EOS)."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """(n,) ids -> text; EOS and out-of-range ids are dropped, bad UTF-8 replaced."""
        ids = np.asarray(ids).reshape(-1)
        return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model loaded from a `.model` file path."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.name = os.fspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.name)
        self.vocab_size = int(self._sp.vocab_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataConfigError(
                f"SentencePiece model {self.name} defines no EOS id: train it with eos_id >= 0 "
                "or use data.tokenizer='byte'"
            )

    def encode(self, text: str | bytes) -> np.ndarray:
        """text -> (n,) int32 token ids (no BOS/EOS)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        """(n,) ids -> text."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def make_tokenizer(spec: str | None):
    """'byte' (or None) -> ByteTokenizer; a path to a `.model` file -> SentencePieceTokenizer."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    path = os.path.expanduser(os.fspath(spec))
    if not os.path.isfile(path):
        raise DataConfigError(
            f"tokenizer file {path!r} does not exist: set data.tokenizer to a SentencePiece "
            "`.model` file (e.g. the Llama-2 tokenizer.model) or to 'byte'"
        )
    try:
        return SentencePieceTokenizer(path)
    except DataConfigError:
        raise
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with long messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataConfigError(
            f"tokenizer file {path!r} is not a SentencePiece model ({first}): "
            "point data.tokenizer at a `.model` file or use 'byte'"
        ) from None
