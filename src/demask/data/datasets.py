"""Datasets: real, offline, each a fixed-length `SequenceDataset` of token ids.

Built-in specs (the `DATASETS` registry) and paths:

* ``"digits"``: scikit-learn's bundled `load_digits()`: 1,797 8x8 images, 17 grey levels, one
  token per pixel (64 tokens, vocab 17). Split: a permutation of the 1,797 images seeded with 0
  (`numpy.random.default_rng(0)`); the first 1,500 are train, the last 297 are val.
* ``"digits-labelled"``: the same images and split, each preceded by its class token
  (`GreyLevelTokenizer(num_classes=10)`: 65 tokens, vocab 27), for class-conditional models
  (`condition_len` = 1: the class token is the condition).
* ``"python-stdlib"``: the `.py` sources of the running Python's standard library
  (`sysconfig.get_paths()["stdlib"]`), byte-level. Left out: `site-packages`, `dist-packages`,
  test folders (`test`, `tests`, `idle_test`), `__pycache__`, hidden folders, the build-specific
  `config-*` folder, `_sysconfigdata_*` files and empty files. Files are sorted by their path
  relative to the stdlib root; every file whose sorted index % 20 == 0 is val, the rest train.
* any path: a UTF-8 text file or a folder of them (recursive, sorted by relative path, hidden
  files and folders and empty files skipped), byte-level. A folder's val split is its last
  max(1, n_files // 10) files by sorted name (for the 38 Shakespeare plays: the last 3); a single
  file's val split is its last 10% of bytes. A folder of one file is split like a single file.

Text files of a split are joined with `DOC_SEPARATOR` (a NUL byte, which never occurs inside an
accepted text file, so it marks document boundaries unambiguously). Train examples are windows
of `seq_len` bytes at every offset (`get_batch` draws the offsets); val examples are fixed,
non-overlapping windows. Loaded bytes are cached in memory per process, keyed on the files'
sizes and modification times.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from demask._checks import check_choice, check_int
from demask.data.tokenizers import ByteTokenizer, GreyLevelTokenizer, Tokenizer

SPLITS = ("train", "val")
DOC_SEPARATOR = b"\x00"
DEFAULT_TEXT_SEQ_LEN = 256
DIGITS_NUM_VAL = 297
DIGITS_SPLIT_SEED = 0
STDLIB_VAL_EVERY = 20
SINGLE_FILE_VAL_FRACTION = 0.1
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})


class SequenceDataset(Dataset):
    """A fixed-length view of token ids: `ds[i]` is a (seq_len,) long tensor.

    `rows` is an (M, seq_len) integer tensor, often a strided view (`unfold`) over one long
    token stream, so that millions of overlapping windows cost no memory.
    """

    def __init__(
        self,
        rows: Tensor,
        tokenizer: Tokenizer,
        *,
        name: str,
        split: str,
        modality: str,
        condition_len: int = 0,
    ):
        self.rows = rows  # (M, seq_len), uint8 or long
        self.tokenizer = tokenizer
        self.condition_len = condition_len  # leading tokens that are a condition (class token)
        self.name = name  # the spec it was built from ("digits", a path, ...)
        self.split = split
        self.modality = modality  # "image" or "text": which pictures and metrics apply
        self.seq_len = int(rows.shape[1])

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} examples")
        return self.rows[i].long()  # (seq_len,)

    def gather(self, indices: Tensor) -> Tensor:
        """(k,) long indices -> (k, seq_len) long examples, in one indexing operation."""
        # index_select, not rows[indices]: on an unfold view advanced indexing took ~20 ms
        # for 32x256 bytes (torch 2.13, CPU), index_select 0.01 ms
        return self.rows.index_select(0, indices).long()

    def __repr__(self) -> str:
        return (
            f"SequenceDataset(name={self.name!r}, split={self.split!r}, modality="
            f"{self.modality!r}, examples={len(self)}, seq_len={self.seq_len}, "
            f"tokenizer={self.tokenizer!r})"
        )


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

    digits = load_digits()
    images = digits.images.astype(np.int64)  # (1797, 8, 8) grey levels 0..16
    labels = digits.target.astype(np.int64)  # (1797,) 0..9
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    n_train = len(images) - DIGITS_NUM_VAL
    parts = {"train": order[:n_train], "val": order[n_train:]}
    return {k: (images[idx], labels[idx]) for k, idx in parts.items()}


def _digits_split_images() -> dict[str, np.ndarray]:
    return {k: v[0] for k, v in _digits_split().items()}


def digits_labels(split: str = "train") -> np.ndarray:
    """The class (0-9) of each digit of a split, aligned with `digits_images(split)`."""
    check_choice("split", split, SPLITS)
    return _digits_split()[split][1].copy()


def digits_images(split: str = "train") -> np.ndarray:
    """The raw digits of a split: (M, 8, 8) int64 grey levels in [0, 16] (train 1500, val 297)."""
    check_choice("split", split, SPLITS)
    return _digits_split_images()[split].copy()


def _build_digits(split: str, seq_len: int | None, max_bytes: int | None) -> SequenceDataset:
    tok = GreyLevelTokenizer(levels=17, image_shape=(8, 8))
    if seq_len is not None and seq_len != tok.seq_len:
        raise ValueError(
            f"seq_len must be {tok.seq_len} (8x8 pixels) for the digits dataset, got {seq_len}"
        )
    if max_bytes is not None:
        raise ValueError(f"max_bytes applies to text datasets only, got {max_bytes} for digits")
    rows = tok.encode(_digits_split_images()[split])  # (M, 64)
    return SequenceDataset(rows, tok, name="digits", split=split, modality="image")


def _build_digits_labelled(
    split: str, seq_len: int | None, max_bytes: int | None
) -> SequenceDataset:
    tok = GreyLevelTokenizer(levels=17, image_shape=(8, 8), num_classes=10)
    if seq_len is not None and seq_len != tok.seq_len:
        raise ValueError(
            f"seq_len must be {tok.seq_len} (a class token and 8x8 pixels) for digits-labelled, "
            f"got {seq_len}"
        )
    if max_bytes is not None:
        raise ValueError(f"max_bytes applies to text datasets only, got {max_bytes} for digits")
    images, labels = _digits_split()[split]
    rows = tok.encode_labelled(images, labels)  # (M, 65)
    return SequenceDataset(
        rows, tok, name="digits-labelled", split=split, modality="image", condition_len=1
    )


# --------------------------------------------------------------------------- text


def _read_text(path: Path) -> bytes:
    """The bytes of a UTF-8 text file; a clear ValueError for empty or binary files."""
    data = path.read_bytes()
    if not data:
        raise ValueError(f"data file {str(path)!r} is empty")
    if b"\x00" in data:
        raise ValueError(f"data file {str(path)!r} looks binary (contains NUL bytes)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r} looks binary (not valid UTF-8 at byte {err.start})"
        ) from None
    return data


def _list_files(
    root: Path, *, suffix: str = "", skip_dirs: frozenset[str] = frozenset()
) -> list[Path]:
    """Non-empty regular files under `root`, recursive, hidden ones skipped, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for fn in filenames:
            f = Path(dirpath) / fn
            keep = not fn.startswith(".") and fn.endswith(suffix) and f.is_file()
            if keep and f.stat().st_size > 0:
                found.append(f)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _fingerprint(files: list[Path]) -> tuple:
    stats = [f.stat() for f in files]
    return tuple((str(f), s.st_size, s.st_mtime_ns) for f, s in zip(files, stats))


@functools.lru_cache(maxsize=16)
def _join_cached(fingerprint: tuple) -> Tensor:
    """Read and join files (cached on their paths, sizes and mtimes) -> (n,) uint8 tensor."""
    parts = [_read_text(Path(entry[0])) for entry in fingerprint]
    return torch.frombuffer(bytearray(DOC_SEPARATOR.join(parts)), dtype=torch.uint8)


def _join(files: list[Path]) -> Tensor:
    return _join_cached(_fingerprint(files))


def _windows(
    stream: Tensor, split: str, seq_len: int, *, name: str, max_bytes: int | None
) -> SequenceDataset:
    """Train: a window at every offset; val: non-overlapping windows."""
    if max_bytes is not None:
        stream = stream[:max_bytes]
    need = seq_len + 1
    if len(stream) < need:
        raise ValueError(
            f"data {name!r} ({split} split) holds {len(stream)} bytes, shorter than one sequence: "
            f"seq_len={seq_len} needs at least {need} bytes"
        )
    step = 1 if split == "train" else seq_len
    rows = stream.unfold(0, seq_len, step)  # (M, seq_len) view, no copy
    return SequenceDataset(rows, ByteTokenizer(), name=name, split=split, modality="text")


def _split_file_bytes(path: Path, split: str) -> Tensor:
    stream = _join([path])
    n_val = max(1, int(len(stream) * SINGLE_FILE_VAL_FRACTION))
    return stream[: len(stream) - n_val] if split == "train" else stream[len(stream) - n_val :]


def _build_path(
    spec: str, split: str, seq_len: int | None, max_bytes: int | None
) -> SequenceDataset:
    seq_len = DEFAULT_TEXT_SEQ_LEN if seq_len is None else seq_len
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"data {spec!r} is neither a built-in dataset {sorted(DATASETS)} "
            "nor an existing file or folder"
        )
    if not path.is_dir() and not path.is_file():  # /dev/zero, a FIFO, a socket: never read
        raise ValueError(
            f"data {spec!r} is not a regular file or a folder (a device, FIFO or socket?); "
            "expected a text file or a folder of text files"
        )
    if path.is_dir():
        files = _list_files(path)
        if not files:
            raise ValueError(f"data folder {spec!r} is empty (no non-empty, non-hidden files)")
        if len(files) == 1:
            stream = _split_file_bytes(files[0], split)
        else:
            n_val = max(1, len(files) // 10)
            chosen = files[: len(files) - n_val] if split == "train" else files[-n_val:]
            _join(files)  # validate every file (train and val) whichever split is asked
            stream = _join(chosen)
    else:
        stream = _split_file_bytes(path, split)
    return _windows(stream, split, seq_len, name=spec, max_bytes=max_bytes)


def stdlib_files(split: str | None = None) -> list[Path]:
    """The standard-library `.py` files used by "python-stdlib" (all, or one split's)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in _list_files(root, suffix=".py", skip_dirs=STDLIB_SKIP_DIRS | {"__pycache__"})
        if not f.name.startswith("_sysconfigdata_")
        and not f.relative_to(root).parts[0].startswith("config-")
    ]
    if split is None:
        return files
    check_choice("split", split, SPLITS)
    is_val = [i % STDLIB_VAL_EVERY == 0 for i in range(len(files))]
    return [f for f, v in zip(files, is_val) if v == (split == "val")]


def _build_stdlib(split: str, seq_len: int | None, max_bytes: int | None) -> SequenceDataset:
    seq_len = DEFAULT_TEXT_SEQ_LEN if seq_len is None else seq_len
    files = stdlib_files(split)
    if not files:
        raise ValueError(
            f"no standard-library sources found under {sysconfig.get_paths()['stdlib']!r}"
        )
    return _windows(_join(files), split, seq_len, name="python-stdlib", max_bytes=max_bytes)


# --------------------------------------------------------------------------- registry

# name -> builder(split, seq_len, max_bytes); anything else is treated as a path.
DATASETS: dict[str, Callable[[str, int | None, int | None], SequenceDataset]] = {
    "digits": _build_digits,
    "digits-labelled": _build_digits_labelled,
    "python-stdlib": _build_stdlib,
}


def get_dataset(
    spec: str | os.PathLike,
    split: str = "train",
    seq_len: int | None = None,
    *,
    max_bytes: int | None = None,
) -> SequenceDataset:
    """Load a dataset split as fixed-length token sequences.

    spec: "digits", "python-stdlib" or a path to a UTF-8 text file or a folder of them (a
        registry name wins over a same-named path; write "./digits" for the folder).
    split: "train" or "val" (fixed, documented splits; see the module docstring).
    seq_len: tokens per example; digits: 64 only; text: default 256.
    max_bytes: text only: keep at most this many bytes of the split (a size cap for quick runs).
    """
    check_choice("split", split, SPLITS)
    if seq_len is not None:
        check_int("seq_len", seq_len, min=1)
    if max_bytes is not None:
        check_int("max_bytes", max_bytes, min=1)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a dataset name or a path, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if not spec.strip():
        raise ValueError(f"spec must name a dataset {sorted(DATASETS)} or a path, got {spec!r}")
    builder: Any = DATASETS.get(spec)
    if builder is None:
        return _build_path(spec, split, seq_len, max_bytes)
    return builder(split, seq_len, max_bytes)
