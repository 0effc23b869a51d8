"""Training text and its tokenizer: the Python standard library's own source, read as bytes.

Why this corpus: it is real text (code, docstrings, comments, and `pydoc_data/topics.py`, the language
reference's prose) that every machine with Python has, offline, with no dataset hub. Its content depends on
the Python version (3.11 on the CPU machine, 3.12 on the GPU one), so losses are comparable between runs on
one machine, not across Python versions; `Corpus.describe()` records which one was read.

What is read: every `*.py` file under `sysconfig.get_paths()["stdlib"]`, except those in folders named
site-packages, dist-packages, test, tests, idle_test or __pycache__ (installed packages, and test suites
full of generated data), sorted by relative path. A file belongs to the held-out (eval) split when the
SHA-256 of its relative path, as an integer, is below `EVAL_PERCENT` modulo 100: a fixed split that a file
added in another Python version does not reshuffle. Each split is its files' bytes joined, each file
followed by `DOCUMENT_SEPARATOR`.

Tokenizer: bytes (vocabulary 256). NUL (0) separates files: Python source cannot contain it, so it is
unambiguous as an end-of-document token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import sysconfig
from pathlib import Path

import torch

CORPUS_NAME = "python-stdlib-source"
EXCLUDED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
EVAL_PERCENT = 5
MIN_TRAIN_BYTES = 1_000_000  # a stripped install (no .py sources) must fail loudly, not train on scraps


class CorpusError(RuntimeError):
    """The corpus cannot be read here (no standard library sources)."""


class ByteTokenizer:
    """UTF-8 bytes as tokens; decoding replaces what is not valid UTF-8 (a model can emit any byte)."""

    vocab_size = 256
    document_separator = 0

    @staticmethod
    def encode(text: str | bytes) -> torch.Tensor:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def decode(tokens) -> str:
        values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return bytes(values).decode("utf-8", errors="replace")


VOCAB_SIZE = ByteTokenizer.vocab_size
DOCUMENT_SEPARATOR = ByteTokenizer.document_separator


@dataclasses.dataclass(frozen=True)
class Corpus:
    root: Path
    train: torch.Tensor  # uint8 [train bytes]
    eval: torch.Tensor  # uint8 [eval bytes]
    train_files: int
    eval_files: int
    sha256: str  # of both splits' bytes: two runs read the same text iff this matches

    def describe(self) -> dict:
        return {"name": CORPUS_NAME, "root": str(self.root), "python": platform.python_version(),
                "tokenizer": f"bytes (vocab {VOCAB_SIZE}, NUL between files)",
                "train_files": self.train_files, "eval_files": self.eval_files,
                "train_tokens": int(self.train.numel()), "eval_tokens": int(self.eval.numel()),
                "sha256": self.sha256}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[str]:
    """Relative POSIX paths of the corpus files under `root`, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if p.is_file() and not EXCLUDED_FOLDERS.intersection(p.relative_to(root).parts[:-1]))


def is_held_out(relative_path: str) -> bool:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100 < EVAL_PERCENT


def load_corpus(root: Path | str | None = None) -> Corpus:
    """Reads the corpus (about 12 MB on CPython 3.11; a fraction of a second). Raises CorpusError, naming the
    folder, when there is too little source text to train on."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise CorpusError(f"corpus: the Python standard library folder {root} does not exist; training reads "
                          f"its .py sources (sysconfig.get_paths()['stdlib'])")
    splits = {False: bytearray(), True: bytearray()}
    counts = {False: 0, True: 0}
    digest = hashlib.sha256()
    for relative in source_files(root):
        held_out = is_held_out(relative)
        data = (root / relative).read_bytes()
        splits[held_out] += data
        splits[held_out].append(DOCUMENT_SEPARATOR)
        counts[held_out] += 1
        digest.update(relative.encode() + b"\0" + data)
    if len(splits[False]) < MIN_TRAIN_BYTES or not counts[True]:
        raise CorpusError(f"corpus: {root} holds {counts[False] + counts[True]} .py files "
                          f"({len(splits[False]) + len(splits[True])} bytes); training needs the standard "
                          f"library's sources (at least {MIN_TRAIN_BYTES} bytes), e.g. a Python install that "
                          f"is not stripped to .pyc files")
    return Corpus(root=root, train=ByteTokenizer.encode(bytes(splits[False])),
                  eval=ByteTokenizer.encode(bytes(splits[True])), train_files=counts[False],
                  eval_files=counts[True], sha256=digest.hexdigest())
