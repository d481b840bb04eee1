"""`eval_mode`: the one eval-mode helper of the package (both wrappers and the evaluator use it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode inside; afterwards every submodule gets back its own training flag.

    `module.train(was_training)` would not do: it sets one flag on every submodule, so a frozen
    submodule (a token critic kept in eval mode inside a training wrapper) would come back in
    training mode. None entries are skipped.
    """
    states = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]
    for mod in modules:
        if mod is not None:
            mod.eval()
    try:
        yield
    finally:
        for m, flag in states:
            m.training = flag
