"""The two libraries behind one interface, so every suite builds both with the same arguments.

`load(lib)` returns the seed API's five classes for "demask" or "reference" (x-transformers); the
constructors are called identically for both, which is the point of the comparison.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import REPO


@dataclass(frozen=True)
class Lib:
    name: str
    TransformerWrapper: Any
    Encoder: Any
    Decoder: Any
    NonAutoregressiveWrapper: Any
    AutoregressiveWrapper: Any


def _demask() -> Lib:
    try:
        import demask
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))
        import demask
    import demask.wrappers as wrappers  # the classes, exported at the top level or not

    def find(name: str) -> Any:
        return getattr(demask, name, None) or getattr(wrappers, name, None)

    return Lib(
        "demask",
        demask.TransformerWrapper,
        demask.Encoder,
        demask.Decoder,
        find("NonAutoregressiveWrapper"),
        find("AutoregressiveWrapper"),
    )


def _reference() -> Lib:
    from x_transformers import Decoder, Encoder, TransformerWrapper
    from x_transformers.autoregressive_wrapper import AutoregressiveWrapper
    from x_transformers.nonautoregressive_wrapper import NonAutoregressiveWrapper

    return Lib(
        "reference",
        TransformerWrapper,
        Encoder,
        Decoder,
        NonAutoregressiveWrapper,
        AutoregressiveWrapper,
    )


LOADERS: dict[str, Callable[[], Lib]] = {"demask": _demask, "reference": _reference}


def load(lib: str) -> Lib:
    """The classes of library `lib` ("demask" or "reference")."""
    if lib not in LOADERS:
        raise ValueError(f"lib must be one of {sorted(LOADERS)}, got {lib!r}")
    return LOADERS[lib]()


def reference_available() -> bool:
    return importlib.util.find_spec("x_transformers") is not None


def build_net(
    lib: Lib,
    *,
    causal: bool,
    num_tokens: int,
    max_seq_len: int,
    dim: int,
    depth: int,
    heads: int,
    net_kwargs: dict[str, Any] | None = None,
    **layer_kwargs: Any,
) -> Any:
    """TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder|Decoder(dim, depth, heads)),
    `net_kwargs` to the TransformerWrapper, the rest to the layers."""
    layers_cls = lib.Decoder if causal else lib.Encoder
    return lib.TransformerWrapper(
        num_tokens=num_tokens,
        max_seq_len=max_seq_len,
        attn_layers=layers_cls(dim=dim, depth=depth, heads=heads, **layer_kwargs),
        **(net_kwargs or {}),
    )


def require(lib: Lib, attr: str) -> Any:
    """The class `attr` of `lib`, or a clear error when that part of demask has not landed."""
    cls = getattr(lib, attr)
    if cls is None:
        raise RuntimeError(f"{lib.name} has no {attr} yet; this workload cannot run")
    return cls
