"""Tokenizers: bytes for text, grey levels for small images.

A tokenizer maps raw data to token ids in [0, vocab_size) and back. It knows nothing about
masking: the mask id is the model's business (typically `vocab_size`, with the model built for
`vocab_size + 1` tokens). Every tokenizer has a registry `name` and a `config()` dict, so that
`get_tokenizer(tok.name, **tok.config())` rebuilds it from a checkpoint; a BPE tokenizer is one
more class and one more line in `TOKENIZERS`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from demask._checks import check_choice, check_int, check_tokens


@runtime_checkable
class Tokenizer(Protocol):
    """What datasets, the CLI and the metrics rely on."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, data: Any) -> Tensor: ...

    def decode(self, ids: Any) -> Any: ...

    def config(self) -> dict[str, Any]: ...


def _as_long_tensor(name: str, ids: Any) -> Tensor:
    """Accept a tensor, numpy array or (nested) list of ints; return a long tensor."""
    if isinstance(ids, Tensor):
        return ids
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind not in "iu":
            raise TypeError(f"{name} must hold integer token ids, got numpy dtype {ids.dtype}")
        return torch.from_numpy(ids.astype(np.int64))
    if isinstance(ids, (list, tuple)):
        return torch.tensor(ids, dtype=torch.long)
    raise TypeError(
        f"{name} must be a tensor, array or list of token ids, got {type(ids).__name__}"
    )


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless for any text.

    `decode` replaces invalid UTF-8 (a model may well sample half a multi-byte character) with
    U+FFFD instead of failing.
    """

    name = "bytes"
    vocab_size = 256

    def encode(self, data: str | bytes) -> Tensor:
        """str (encoded as UTF-8) or bytes -> (n,) long tensor of byte values."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
        if not data:  # torch.frombuffer refuses an empty buffer
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # (n,)

    def decode(self, ids: Any) -> str | list[str]:
        """(n,) ids -> str; (B, n) ids -> list of B strings."""
        ids = check_tokens("ids", _as_long_tensor("ids", ids), num_tokens=256, ndim=(1, 2))
        if ids.ndim == 2:
            return [self._decode_row(row) for row in ids]
        return self._decode_row(ids)

    @staticmethod
    def _decode_row(row: Tensor) -> str:
        return bytes(row.to(torch.uint8).tolist()).decode("utf-8", errors="replace")

    def config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class GreyLevelTokenizer:
    """Grey-level images as tokens: one token per pixel, token = grey level in [0, levels).

    Pixels are read in row-major order, so an (H, W) image becomes H*W tokens. The default fits
    scikit-learn's `load_digits()`: 8x8 images with 17 grey levels (0 = background, 16 = ink).
    With `num_classes` > 0 a labelled image is one class token (id levels + label) followed by
    its pixels: H*W + 1 tokens, vocabulary levels + num_classes (class-conditional models).
    """

    name = "grey-levels"

    def __init__(
        self, levels: int = 17, image_shape: tuple[int, int] = (8, 8), num_classes: int = 0
    ):
        self.levels = check_int("levels", levels, min=2)
        self.num_classes = check_int("num_classes", num_classes, min=0)
        if len(image_shape) != 2:
            raise ValueError(f"image_shape must be (height, width), got {image_shape!r}")
        h = check_int("image_shape[0]", image_shape[0], min=1)
        w = check_int("image_shape[1]", image_shape[1], min=1)
        self.image_shape = (h, w)

    @property
    def vocab_size(self) -> int:
        return self.levels + self.num_classes

    @property
    def prefix_len(self) -> int:
        """Tokens before the pixels: 1 (the class token) when labelled, else 0."""
        return 1 if self.num_classes else 0

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.image_shape[0] * self.image_shape[1]

    def class_token(self, label: int) -> int:
        """The token id of class `label`."""
        if not self.num_classes:
            raise ValueError("class tokens need a tokenizer with num_classes > 0")
        return self.levels + check_int("label", label, min=0, max=self.num_classes - 1)

    def allowed_tokens(self, num_tokens: int) -> Tensor | None:
        """(seq_len, num_tokens) bool for labelled images: class tokens in the class slot, grey
        levels at the pixels (`generate(allowed_tokens=...)`), for a model of num_tokens ids (its
        mask token among them); None without classes."""
        if not self.num_classes:
            return None
        check_int("num_tokens", num_tokens, min=self.vocab_size)
        allowed = torch.zeros(self.seq_len, num_tokens, dtype=torch.bool)
        allowed[: self.prefix_len, self.levels : self.vocab_size] = True
        allowed[self.prefix_len :, : self.levels] = True
        return allowed

    def encode_labelled(self, images: Any, labels: Any) -> Tensor:
        """(M, H, W) images and (M,) labels -> (M, 1 + H*W) ids: class token, then pixels."""
        if not self.num_classes:
            raise ValueError("encode_labelled needs a tokenizer with num_classes > 0")
        lab = torch.as_tensor(np.asarray(labels)).long().reshape(-1)  # (M,)
        pixels = self.encode(images)  # (M, H*W)
        if pixels.ndim != 2 or len(lab) != len(pixels):
            raise ValueError(
                f"labels must hold one label per image, got {len(lab)} labels for images of "
                f"shape {tuple(pixels.shape)}"
            )
        check_tokens("labels", lab, num_tokens=self.num_classes, ndim=1)
        return torch.cat([self.levels + lab[:, None], pixels], dim=1)

    def encode(self, images: Any) -> Tensor:
        """(..., H, W) grey levels (any numeric dtype, integral values) -> (..., H*W) long ids
        (the pixels only; `encode_labelled` adds the class token)."""
        arr = np.asarray(images.cpu() if isinstance(images, Tensor) else images)
        h, w = self.image_shape
        if arr.ndim < 2 or arr.shape[-2:] != (h, w):
            raise ValueError(
                f"images must have shape (..., {h}, {w}), got shape {tuple(arr.shape)}"
            )
        if arr.dtype.kind not in "iuf" or (arr.size and not np.all(arr == np.round(arr))):
            raise ValueError(
                f"images must hold integral grey levels in [0, {self.levels - 1}], "
                f"got non-integral values (dtype {arr.dtype})"
            )
        ids = torch.from_numpy(arr.astype(np.int64)).reshape(*arr.shape[:-2], h * w)
        return check_tokens("images", ids, num_tokens=self.levels, ndim=ids.ndim)

    def decode(self, ids: Any) -> np.ndarray:
        """(..., seq_len) ids -> (..., H, W) int64 numpy array of grey levels (a class token,
        when labelled, is dropped)."""
        ids = _as_long_tensor("ids", ids)
        if ids.ndim == 0 or ids.shape[-1] != self.seq_len:
            raise ValueError(
                f"ids must have {self.seq_len} tokens in the last dimension for images of shape "
                f"{self.image_shape}, got shape {tuple(ids.shape)}"
            )
        ids = ids[..., self.prefix_len :]
        ids = check_tokens("ids", ids, num_tokens=self.levels, ndim=max(ids.ndim, 1))
        return ids.reshape(*ids.shape[:-1], *self.image_shape).cpu().numpy()

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"levels": self.levels, "image_shape": list(self.image_shape)}
        if self.num_classes:
            cfg["num_classes"] = self.num_classes
        return cfg

    def __repr__(self) -> str:
        extra = f", num_classes={self.num_classes}" if self.num_classes else ""
        return f"GreyLevelTokenizer(levels={self.levels}, image_shape={self.image_shape}{extra})"


# name -> class; a new tokenizer (BPE, ...) is one line here.
TOKENIZERS: dict[str, type] = {
    ByteTokenizer.name: ByteTokenizer,
    GreyLevelTokenizer.name: GreyLevelTokenizer,
}


def get_tokenizer(name: str, **config: Any) -> Tokenizer:
    """Build a tokenizer by registry name, e.g. `get_tokenizer(tok.name, **tok.config())`."""
    check_choice("tokenizer", name, TOKENIZERS)
    if "image_shape" in config:
        config["image_shape"] = tuple(config["image_shape"])
    return TOKENIZERS[name](**config)
