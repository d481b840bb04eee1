"""The `demask` command line: `demask train | sample | eval | demo` (and whatever else registers).

The CLI only parses arguments and calls the library. Each subcommand lives in its own module and
adds one `Command` to the `COMMANDS` registry; `main` builds the parser from the registry, so a new
subcommand (for example `bench`) is one module plus one entry in `_COMMAND_MODULES`.

Bad input is reported as ONE line on stderr (`demask <command>: error: ...`) with exit code 2 and no
traceback: the library raises ValueError / TypeError (and the OS raises FileNotFoundError ...), the
CLI maps them. Set DEMASK_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

from demask.cli._common import CLIError, Command, one_line

__all__ = ["COMMANDS", "Command", "main", "build_parser", "register", "CLIError"]

USAGE_ERROR = 2  # argparse's own exit code for bad usage; we use it for every bad-input case
INTERRUPTED = 130


COMMANDS: dict[str, Command] = {}

# Modules under demask.cli that each define `COMMAND`; order = order in `demask --help`.
_COMMAND_MODULES: tuple[str, ...] = ("train", "sample", "eval_cmd", "demo")

# Exceptions that mean "the input was bad", not "demask has a bug". They become one line + exit 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, ValueError, TypeError, OSError)
# command -> the options that size its allocations (named when memory runs out)
_MEMORY_OPTIONS = {"train": ("batch_size", "seq_len"), "sample": ("num",),
                   "eval": ("num", "batch_size"), "demo": ("num",)}  # fmt: skip


def out_of_memory(err: BaseException, command: str, args: argparse.Namespace) -> str | None:
    """A one-line message when `err` is an allocation failure (torch's CPU allocator, CUDA out of
    memory, MemoryError), naming the options that size the allocation; None otherwise."""
    text = str(err)
    oom = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
    if not (oom or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    asked = re.search(r"tried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    detail = f"tried to allocate {asked.group(1)}" if asked else type(err).__name__
    given = [f"--{o.replace('_', '-')} {getattr(args, o)}" for o in _MEMORY_OPTIONS.get(command, ())
             if getattr(args, o, None) is not None]  # fmt: skip
    hint = f"; try a smaller {' or '.join(g.split()[0] for g in given)}" if given else ""
    return f"out of memory ({detail}) with {', '.join(given) or 'these options'}{hint}"


def register(command: Command) -> Command:
    """Add a subcommand to the registry (a later registration with the same name replaces it)."""
    COMMANDS[command.name] = command
    return command


def _load_commands() -> None:
    for module in _COMMAND_MODULES:
        if module in COMMANDS:
            continue
        register(importlib.import_module(f"demask.cli.{module}").COMMAND)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the usage too; we keep that
    short): `demask train: error: ...`, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {one_line(message)}\n")
        sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    _load_commands()
    parser = _Parser(
        prog="demask",
        description=(
            "Masked (MaskGIT / Mask-Predict / MDLM) and autoregressive generation of discrete "
            "sequences. Start with `demask demo`."
        ),
        epilog="Run `demask <command> --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for command in COMMANDS.values():
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=command.epilog or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(p)
        p.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `demask` and `python -m demask`. Returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed)
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    args._argv = list(sys.argv[1:] if argv is None else argv)  # for --nproc relaunches
    command: Command | None = getattr(args, "_command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"demask {command.name}: interrupted\n")
        return INTERRUPTED
    except _USER_ERRORS as err:
        if os.environ.get("DEMASK_DEBUG"):
            raise
        sys.stderr.write(f"demask {command.name}: error: {one_line(str(err) or repr(err))}\n")
        return USAGE_ERROR
    except (RuntimeError, MemoryError) as err:  # torch's allocation failures are RuntimeErrors
        message = out_of_memory(err, command.name, args)
        if message is None or os.environ.get("DEMASK_DEBUG"):
            raise
        sys.stderr.write(f"demask {command.name}: error: {message}\n")
        return USAGE_ERROR
