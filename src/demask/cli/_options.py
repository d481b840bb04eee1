"""Command-line options generated from the config dataclasses: one flag per field.

A field `attn_kv_heads` becomes `--attn-kv-heads` (dest `attn_kv_heads`), typed from its
annotation (a bool field becomes `--ff-glu` / `--no-ff-glu`), with the field's own comment in
`demask.config` as its help and its default shown. Options left out are None and keep the
dataclass default (or, on --resume, the run's saved value), so a new config field, and with it a
new constructor option, reaches the command line without an edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

_FIELD = re.compile(r"^\s+(\w+): [^=]+=.*?(?:  # (.*))?$")
_ABOVE = re.compile(r"^\s+# (?!---)(.*)$")


def field_help(cls: type) -> dict[str, str]:
    """{field: its comment} of a dataclass's source: the comment on the field's line, else a
    comment line just above it (empty when the source is not available)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out = {}
    for before, line in zip(["", *lines], lines):
        field, above = _FIELD.match(line), _ABOVE.match(before)
        if field and (field.group(2) or above):
            out[field.group(1)] = field.group(2) or above.group(1)  # type: ignore[union-attr]
    return out


def _base_type(hint: Any) -> Any:
    """bool / int / float / str of an annotation such as `int | None`."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next(a for a in args if a is not type(None))


def add_config_arguments(
    group: Any,
    cls: type,
    *,
    skip: Iterable[str] = (),
    flags: Mapping[str, tuple[str, ...]] | None = None,
    types: Mapping[str, Any] | None = None,
) -> list[str]:
    """Add one option per field of the dataclass `cls` to `group`, except `skip`; `flags` gives
    a field other spellings (the first is shown, the rest are deprecated aliases), `types` an
    argparse type of its own (default: the annotation's). Returns the fields added."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    skipped, flags = set(skip), flags or {}
    added = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skipped:
            continue
        names = flags.get(f.name, ("--" + f.name.replace("_", "-"),))
        base = _base_type(hints[f.name])
        text = helps.get(f.name, f.name.replace("_", " "))
        if len(names) > 1:
            text += f"; also spelt {', '.join(names[1:])} (deprecated)"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        kwargs["help"] = f"{text} (default: {f.default})".replace("%", "%%")
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = (types or {}).get(f.name, base)
            kwargs["metavar"] = base.__name__.upper()
        group.add_argument(*names, **kwargs)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, cls: type, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """{field: value} of the options of `cls`'s fields that the user gave."""
    skipped = set(skip)
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in skipped and getattr(args, f.name, None) is not None
    }
