"""Argument validation shared by the whole package.

Every check raises an error that names the argument, what was given and what is expected, so that
bad input never turns into a silent wrong result deep inside a forward pass. Use these helpers
instead of writing new `if ...: raise` blocks; there is one way to validate an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


def check_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """`value` must be an int (not a bool) within [min, max]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if min is not None and value < min:
        raise ValueError(f"{name} must be >= {min}, got {value}")
    if max is not None and value > max:
        raise ValueError(f"{name} must be <= {max}, got {value}")
    return value


def check_float(
    name: str,
    value: Any,
    *,
    min: float | None = None,
    max: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """`value` must be a finite real number within the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    lo_ok = min is None or (value >= min if min_inclusive else value > min)
    hi_ok = max is None or (value <= max if max_inclusive else value < max)
    if not (lo_ok and hi_ok):
        lo = "(-inf" if min is None else ("[" if min_inclusive else "(") + f"{min:g}"
        hi = "inf)" if max is None else f"{max:g}" + ("]" if max_inclusive else ")")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {value:g}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """`value` must be one of `choices` (used for registry names)."""
    options = sorted(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_tokens(
    name: str,
    x: Any,
    *,
    num_tokens: int,
    ndim: int | tuple[int, ...] = 2,
    seq_len: int | None = None,
    forbidden: int | None = None,
    ignore_index: int | None = None,
    nonempty: bool = False,
) -> Tensor:
    """`x` must be a tensor of token ids in [0, num_tokens); returns it as torch.long.

    The dtype rule of the package: any integer dtype is accepted and converted to torch.long
    (a copy unless it already is long); bool, floating and complex tensors are refused. Use the
    returned tensor. ndim: the allowed number of dimensions; seq_len: the required size of the
    last dimension; forbidden: the mask id, which must not occur (in training data); ignore_index: a value exempt from the range check (a loss's ignored target);
    nonempty: refuse a tensor without elements (an empty batch has no loss).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(
            f"{name} must hold integer token ids (any integer dtype), got dtype {x.dtype}"
        )
    x = x.long()
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if seq_len is not None and x.shape[-1] != seq_len:
        raise ValueError(
            f"{name} must have length {seq_len} in its last dimension, got shape {tuple(x.shape)}"
        )
    if nonempty and x.numel() == 0:
        raise ValueError(
            f"{name} is empty (shape {tuple(x.shape)}): expected at least one sequence of tokens"
        )
    ids = x if ignore_index is None else x[x != ignore_index]
    if ids.numel() > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_tokens:
            raise ValueError(
                f"{name} holds token ids in [{lo}, {hi}], expected ids in [0, {num_tokens - 1}]"
            )
        if forbidden is not None and bool((ids == forbidden).any()):
            raise ValueError(f"{name} contains mask_id={forbidden}, which is reserved")
    return x


def reject_unknown_kwargs(owner: str, kwargs: dict[str, Any]) -> None:
    """Raise TypeError naming every keyword argument that nothing consumed."""
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(f"{owner} got unexpected keyword argument(s): {names}")
