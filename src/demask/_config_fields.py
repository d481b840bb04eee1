"""Helpers of demask.config's dataclasses: defaults read from constructor signatures, field
types checked from the annotations, and the deprecated field names of older formats."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import field
from typing import Any


def seed_default(constructor: Callable[..., Any], name: str) -> Any:
    """A dataclass field whose default is `constructor`'s default for parameter `name`."""
    default = inspect.signature(constructor).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{constructor.__qualname__} has no default for {name}")
    return field(default=default, metadata={"constructor": constructor})


def deprecated_names(cls: Any, aliases: dict[str, str]) -> Any:
    """Let `cls(old=...)` (and `from_dict`) still accept the field names of format version 1,
    with a DeprecationWarning; the value goes to the new field (and wins over it)."""
    init = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for old, new in aliases.items():
            if old in kwargs:
                warnings.warn(
                    f"{cls.__name__}({old}=...) is deprecated; use {new}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.deprecated_names = dict(aliases)
    return cls


def check_types(config: Any) -> None:
    """TypeError unless every field holds a value of its annotated type (an int is a float)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        allowed = tuple(int if a is float else a for a in allowed) + allowed
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, tuple(type(None) if a is None else a for a in allowed))
        if not ok:
            raise TypeError(f"{f.name} must be {_type_name(hint)}, got {type(value).__name__} "
                            f"{value!r}")  # fmt: skip


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = {type(None): "None", int: "an int"}
    return " or ".join(names.get(a, f"a {a.__name__}") for a in args)
