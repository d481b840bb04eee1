"""Helpers shared by the subcommands: the CLI's error type, prompt parsing, small I/O helpers.

Nothing here imports torch at module level, so `demask --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOLE_MARKER = "[MASK]"
# The one rule for holes: `[MASK]` is one hole token, `[MASK:N]` is N hole tokens with N a decimal
# whole number in [1, MAX_HOLES] (for example `[MASK:12]`). Anything else after `[MASK:` up to the
# next `]`, or a `[MASK:` never closed, is an error; `[MASK` followed by other text (`[MASKED]`)
# is plain text.
MAX_HOLES = 1 << 20  # far above any model's sequence length; the length check then names it
_HOLE_RE = re.compile(r"\[MASK(?::([^\]]*))?\]")
_UNCLOSED = "[MASK:"


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, longer description, argument adder and runner."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


class CLIError(Exception):
    """Bad input found by the CLI itself; printed as one line, exit code 2."""


def one_line(message: str) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def parse_prompt(text: str, encode: Callable[[str], Sequence[int]]) -> list[int | None]:
    """Split a prompt into token ids and holes (`None`).

    `[MASK]` marks one token to fill and `[MASK:N]` marks N tokens; everything else is encoded with
    `encode`. Example with a byte tokenizer: `"def [MASK:4](x):"` -> ids of "def ", 4 holes, ids of
    "(x):".
    """
    out: list[int | None] = []

    def add_text(piece: str) -> None:
        if piece:  # some tokenizers refuse an empty string
            out.extend(int(i) for i in encode(piece))

    pos = 0
    for match in _HOLE_RE.finditer(text):
        add_text(text[pos : match.start()])
        out.extend([None] * _hole_count(match.group(0), match.group(1)))
        pos = match.end()
    if _UNCLOSED in text[pos:]:
        raise CLIError(
            f"--prompt: hole marker {_UNCLOSED!r} is not closed by ']': expected [MASK] or [MASK:N]"
        )
    add_text(text[pos:])
    return out


def _hole_count(marker: str, count: str | None) -> int:
    """The number of holes of one `[MASK]` / `[MASK:N]` marker (see _HOLE_RE)."""
    if count is None:
        return 1
    if count.isascii() and count.isdigit() and len(count) <= 8 and 1 <= int(count) <= MAX_HOLES:
        return int(count)
    raise CLIError(
        f"--prompt: bad hole marker {marker!r}: expected [MASK] or [MASK:N] with N a whole number "
        f"from 1 to {MAX_HOLES}"
    )


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (`demask.runfolder.atomic_write_text`)."""
    from demask.runfolder import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def format_table(rows: Sequence[tuple[str, Any]]) -> str:
    """A two-column plain-text table: metric name, value (floats with 4 significant decimals)."""
    width = max((len(name) for name, _ in rows), default=0)
    lines = []
    for name, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"  {name.ljust(width)}  {shown}")
    return "\n".join(lines)


def _int_at_least(text: str, low: int) -> int:
    """argparse type body: an int >= low, or an ArgumentTypeError saying what was expected."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


MAX_SEED = 2**63 - 1  # demask.config.MAX_SEED (not imported: that module imports torch)


def seed_int(text: str) -> int:
    """argparse type: a random seed, an int in [0, 2**63 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, 2**63 - 1], got {text!r}"
        ) from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63 - 1], got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return value


# sampling option -> its deprecated flag, named beside the current one in error messages
DEPRECATED_SAMPLING_FLAGS = {"decode_steps": "--steps"}


def flag(name: str) -> str:
    """The command-line flag of a sampling option (`decode_steps` -> `--decode-steps (--steps)`)."""
    current = "--" + name.replace("_", "-")
    old = DEPRECATED_SAMPLING_FLAGS.get(name)
    return f"{current} ({old})" if old else current


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling options shared by `demask sample` and `demask eval`."""
    p.add_argument(
        "--sampler",
        help="masked models: confidence | low_confidence | random | margin | entropy | halton | "
        "dilated | ancestral | remdm | threshold | factor | entropy_bound (default: ancestral)",
    )
    p.add_argument(
        "--decode-steps",
        "--steps",
        dest="decode_steps",
        type=positive_int,
        help="masked models: demasking steps (default: the model's; --steps is the deprecated "
        "spelling)",
    )
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=1.0,
        help="sampling temperature, 0 = greedy (default: %(default)s)",
    )
    p.add_argument(
        "--filter-thres",
        type=float,
        help="keep the top ceil((1 - F) * vocab) logits before sampling (default: 0, no "
        "filtering; the seed's MaskGIT decoding uses 0.7)",
    )
    p.add_argument(
        "--anneal",
        action="store_true",
        help="masked models: anneal the temperature linearly to 0 over the steps (the seed's "
        "MaskGIT decoding); default: a constant temperature",
    )
    p.add_argument(
        "--class",
        dest="class_label",
        type=non_negative_int,
        help="class-conditional models (demask train --conditional): generate this class",
    )
    p.add_argument(
        "--guidance",
        type=non_negative_float,
        help="with --class, or a model trained with --predict-dropped-cond (guided by the class "
        "it draws first): classifier-free guidance scale w, sampling from u + w (c - u) "
        "(0 = unconditional, 1 = conditional, > 1 stronger); default: plain conditional",
    )
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available, else cpu)")
