"""ttt.data: deterministic, resumable grain pipelines for text, MQAR and images.

Entry point: `make_dataset(data_config, split, global_batch_size, *, seed, shard_index=0,
shard_count=1)`; `meta(data_config)` and `validate(data_config)` work without building it.
"""

from ttt.data.errors import DataConfigError
from ttt.data.mqar import brute_force_answers, mqar_example
from ttt.data.pipeline import NAMES, Dataset, make_dataset, meta, validate
from ttt.data.text_sources import LocalTextCorpus, build_local_corpus, embedded_corpus
from ttt.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

__all__ = [
    "NAMES",
    "ByteTokenizer",
    "DataConfigError",
    "Dataset",
    "LocalTextCorpus",
    "SentencePieceTokenizer",
    "brute_force_answers",
    "build_local_corpus",
    "embedded_corpus",
    "make_dataset",
    "make_tokenizer",
    "meta",
    "mqar_example",
    "validate",
]
