"""Where text documents come from: the embedded corpus, local files, or the tfds catalog.

Every source is a random-access sequence of documents (str or bytes) for one split, so the
same grain pipeline (shard -> shuffle -> tokenize -> pack) serves all of them.

- "text_corpus": Python's own standard-library `.py` sources of the running interpreter (found
  with `sysconfig`; test suites, idlelib, tkinter, lib2to3, turtledemo, ensurepip and
  site-packages left out). One document per file, files in sorted relative-path order; a file
  goes to validation when crc32(relative path) % 100 < 5. About 560 files / 10.6 MB on
  CPython 3.11 -- the exact set follows the installed Python version.
- "text_files": user files or folders, written once as `array_record` by the tfds builder
  `LocalTextCorpus` under `data_dir` and read back with `tfds.data_source` (no TensorFlow).
- "tfds_text": a prepared tfds catalog dataset (`lm1b`, `pg19`, ...) read with
  `tfds.data_source` from `data_dir`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import sysconfig
import zlib

import tensorflow_datasets as tfds
from etils import epath

from ttt.data.errors import DataConfigError

_STDLIB_SKIP = frozenset(
    {"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "ensurepip",
     "site-packages", "dist-packages", "__pycache__"}
)
VALIDATION_PERCENT = 5


def _is_validation(rel_path: str) -> bool:
    """Fixed split by path hash: stable across runs and independent of the file count."""
    return zlib.crc32(rel_path.encode("utf-8")) % 100 < VALIDATION_PERCENT


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[tuple[str, pathlib.Path], ...]:
    """Sorted (relative path, absolute path) of the embedded corpus files."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not any(part in _STDLIB_SKIP for part in rel.parts) and path.is_file():
            files.append((rel.as_posix(), path))
    return tuple(sorted(files))


class _FileDocuments:
    """Lazy random-access documents: item i is the bytes of file i."""

    def __init__(self, paths):
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> bytes:
        return pathlib.Path(self._paths[i]).read_bytes()


def embedded_corpus(split: str) -> _FileDocuments:
    """The standard-library corpus for "train" or "validation" (see module docstring)."""
    want_val = split != "train"
    paths = [p for rel, p in stdlib_files() if _is_validation(rel) == want_val]
    if not paths:
        raise DataConfigError(
            f"no Python standard-library sources found under {sysconfig.get_paths()['stdlib']}: "
            "use data.name='text_files' with your own paths"
        )
    return _FileDocuments(paths)


# --------------------------------------------------------------------------- local files


def list_text_files(paths) -> list[tuple[str, pathlib.Path]]:
    """Expand files/folders into sorted (relative name, path); hidden files are skipped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for entry in paths:
        p = pathlib.Path(os.path.expanduser(os.fspath(entry)))
        if not p.exists():
            raise DataConfigError(
                f"text path {str(p)!r} does not exist: fix data.paths (files or folders of text)"
            )
        if p.is_file():
            out.append((p.name, p))
            continue
        for f in sorted(p.rglob("*")):
            rel = f.relative_to(p)
            if f.is_file() and not any(part.startswith(".") for part in rel.parts):
                out.append(((pathlib.Path(p.name) / rel).as_posix(), f))
    return sorted(out, key=lambda t: (t[0], str(t[1])))


class LocalTextCorpusConfig(tfds.core.BuilderConfig):
    """One config per set of input files; its name hashes their paths, sizes and mtimes."""

    def __init__(self, *, paths, **kwargs):
        files = list_text_files(paths)
        digest = hashlib.sha1()
        for rel, f in files:
            st = f.stat()
            digest.update(f"{rel}\0{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        super().__init__(name="c" + digest.hexdigest()[:16], **kwargs)
        self.files = files


class LocalTextCorpus(tfds.core.GeneratorBasedBuilder):
    """tfds builder for local text: one example {"text", "path"} per file.

    Splits: a file is in "validation" when crc32(its relative name) % 100 < 5 (if that leaves
    a split empty, the last file in sorted order moves over); with a single file, its last 5%
    of lines (at least one) form the validation split instead.
    """

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = []  # configs are made per call from the paths

    # tfds's default lookup touches the `importlib_resources` backport, which tfds only
    # installs on Python < 3.9; pointing at this file directly avoids it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one document per file.",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        files = self.builder_config.files
        if len(files) == 1:
            rel, f = files[0]
            lines = f.read_bytes().splitlines(keepends=True)
            cut = len(lines) - max(1, len(lines) * VALIDATION_PERCENT // 100)
            docs = {"train": [(rel, b"".join(lines[:cut]))],
                    "validation": [(rel, b"".join(lines[cut:]))]}
        else:
            docs = {"train": [], "validation": []}
            for rel, f in files:
                docs["validation" if _is_validation(rel) else "train"].append((rel, f))
            # Small corpora can hash entirely to one side; keep both splits non-empty.
            if not docs["validation"]:
                docs["validation"].append(docs["train"].pop())
            elif not docs["train"]:
                docs["train"].append(docs["validation"].pop(0))
        return {split: self._generate_examples(items) for split, items in docs.items()}

    def _generate_examples(self, items):
        for rel, content in items:
            data = content.read_bytes() if isinstance(content, pathlib.Path) else content
            yield rel, {"text": data.decode("utf-8", errors="replace"), "path": rel}


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "ttt", "tfds")


def build_local_corpus(paths, data_dir: str | None = None) -> LocalTextCorpus:
    """Write `paths` as array_record under `data_dir` (once per distinct file set) -> builder."""
    files = list_text_files(paths)
    if not files:
        raise DataConfigError(
            f"no files found under data.paths={paths!r}: point it at text files or folders "
            "containing them"
        )
    if sum(f.stat().st_size for _, f in files) == 0:
        raise DataConfigError(
            "the text corpus in data.paths is empty (all files have 0 bytes): add text"
        )
    config = LocalTextCorpusConfig(paths=paths)
    builder = LocalTextCorpus(
        config=config, data_dir=data_dir or default_cache_dir(), file_format="array_record"
    )
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def local_corpus(paths, split: str, data_dir: str | None = None):
    """Random-access documents of a local corpus split, read with `tfds.data_source`."""
    builder = build_local_corpus(paths, data_dir)
    name = f"{builder.name}/{builder.builder_config.name}:{builder.version}"
    source = tfds.data_source(name, split=split, data_dir=builder.data_dir_root, download=False)
    return _Field(source, "text")


# --------------------------------------------------------------------------- tfds catalog


class _Field:
    """View of one feature of a tfds data source (records are dicts)."""

    def __init__(self, source, key: str):
        self._source, self._key = source, key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int):
        return self._source[i][self._key]


def tfds_builder(name: str, data_dir: str | None):
    """`tfds.builder` with a one-line error when the name resolves to nothing."""
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataConfigError(
            f"tfds dataset {name!r} is neither prepared in {data_dir or 'the default data_dir'} "
            "nor importable from the tfds catalog without TensorFlow (e.g. c4): check the name "
            "(tfds.list_builders()) or prepare it elsewhere and set data.data_dir"
        ) from None


def open_tfds(name: str, split: str, data_dir: str | None):
    """`tfds.data_source` with one-line errors for an unknown or unprepared dataset."""
    where = data_dir or "the default tfds data_dir"
    builder = tfds_builder(name, data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except ValueError as e:
        if "split" in str(e).lower():
            known = list(builder.info.splits.keys()) if builder.is_prepared() else "?"
            raise DataConfigError(
                f"tfds dataset {name!r} has no split {split!r} (has {known}): "
                "set the split names in data.splits"
            ) from None
        raise
    except Exception:
        raise DataConfigError(
            f"tfds dataset {name!r} is not prepared as array_record in {where}: run "
            f"`tfds build {name} --data_dir <dir> --file_format array_record` where it can "
            "download, then set data.data_dir to that folder"
        ) from None
    return source, builder


def text_feature(builder, configured: str | None) -> str:
    """The Text feature to read: `configured`, else 'text', else the only Text feature."""
    features = builder.info.features
    if configured:
        if configured not in features:
            raise DataConfigError(
                f"tfds dataset {builder.name!r} has no feature {configured!r} "
                f"(has {sorted(features.keys())}): fix data.text_key"
            )
        return configured
    if "text" in features:
        return "text"
    texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
    if "book_text" in features:  # pg19 also has Text-typed metadata; the book is the document
        return "book_text"
    if len(texts) != 1:
        raise DataConfigError(
            f"cannot tell which feature of {builder.name!r} holds the text ({texts}): "
            "set data.text_key"
        )
    return texts[0]


def tfds_text(name: str, split: str, data_dir: str | None, text_key: str | None = None):
    """Random-access documents from a prepared tfds text dataset."""
    source, builder = open_tfds(name, split, data_dir)
    return _Field(source, text_feature(builder, text_key))
