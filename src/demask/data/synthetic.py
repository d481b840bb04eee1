"""Synthetic sources with a known entropy rate, for tests and benchmarks of context use."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from demask._checks import check_float, check_int


def shift_chain(
    n: int, length: int, generator: torch.Generator, vocab: int = 64, keep: float = 0.9
) -> Tensor:
    """(n, length) rows of an order-1 Markov chain on `vocab` symbols.

    The first symbol is uniform; each next one is (5 * previous + 1) % vocab with probability
    `keep`, else uniform. The uniform law is stationary, so a model that ignores the context
    scores log2(vocab) bits per symbol, and one that sees the previous symbol
    `shift_chain_entropy_rate(vocab, keep)`.
    """
    check_int("n", n, min=1)
    check_int("length", length, min=1)
    check_int("vocab", vocab, min=2)
    check_float("keep", keep, min=0.0, max=1.0)
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(vocab, (n,), generator=generator)
    for i in range(1, length):
        stay = torch.rand(n, generator=generator) < keep
        jump = torch.randint(vocab, (n,), generator=generator)
        x[:, i] = torch.where(stay, (5 * x[:, i - 1] + 1) % vocab, jump)
    return x


def shift_chain_entropy_rate(vocab: int = 64, keep: float = 0.9) -> float:
    """Bits per symbol of `shift_chain` given the previous symbol."""
    p = keep + (1 - keep) / vocab  # the shifted symbol (also reachable by a uniform jump)
    rest = (1 - keep) / vocab  # each of the other vocab - 1 symbols
    return -(p * math.log2(p) + (vocab - 1) * rest * math.log2(rest)) if rest > 0 else 0.0
