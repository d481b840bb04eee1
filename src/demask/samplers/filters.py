"""Logits filters: each maps logits (..., V) to logits (..., V) with the removed entries at -inf.

They are pure functions of the logits (no model, no randomness), so the masked and the
autoregressive decoders share them. This file holds the one top-k of the package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from demask._checks import check_float, check_int

__all__ = ["top_k", "top_k_compact", "top_k_count", "top_p", "min_p", "top_a"]


def top_k_count(vocab_size: int, *, k: int | None = None, thres: float | None = None) -> int:
    """How many logits `top_k` keeps for a vocabulary of `vocab_size`.

    Exactly one of `k` and `thres` is given. `thres` is the seed's `filter_thres`: it keeps
    `ceil((1 - thres) * V)` logits, computed with the same float expression as the seed (so
    `thres=0.7, V=10` keeps 4, because `(1 - 0.7) * 10` is 3.0000000000000004).
    """
    if (k is None) == (thres is None):
        raise ValueError(f"top_k needs exactly one of k and thres, got k={k!r}, thres={thres!r}")
    if thres is not None:
        thres = check_float("filter_thres", thres, min=0.0, max=1.0, max_inclusive=False)
        return max(1, min(vocab_size, math.ceil((1 - thres) * vocab_size)))
    return check_int("k", k, min=1, max=vocab_size)


def top_k(logits: Tensor, k: int | None = None, thres: float | None = None) -> Tensor:
    """Keep the `k` largest logits of the last dimension (exactly k, ties broken by index).

    logits: (..., V) -> (..., V). `thres` (the seed's filter_thres) keeps ceil((1 - thres) * V).
    """
    vocab_size = logits.shape[-1]
    if top_k_count(vocab_size, k=k, thres=thres) == vocab_size:
        return logits
    values, indices = top_k_compact(logits, k=k, thres=thres)  # (..., k)
    out = torch.full_like(logits, -math.inf)
    return out.scatter_(-1, indices, values)


def top_k_compact(
    logits: Tensor, k: int | None = None, thres: float | None = None
) -> tuple[Tensor, Tensor]:
    """The kept logits of `top_k` without the -inf padding: (values, vocabulary indices).

    logits: (..., V) -> values (..., k), indices (..., k) long, sorted by decreasing logit.
    Decoders sample over these k entries instead of all V (less noise to draw, less to sort).
    """
    count = top_k_count(logits.shape[-1], k=k, thres=thres)
    return logits.topk(count, dim=-1)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751).

    Keeps the smallest set of most probable tokens whose total probability is >= p (the most
    probable token is always kept). logits: (..., V) -> (..., V).
    """
    p = check_float("top_p", p, min=0.0, max=1.0, min_inclusive=False)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.double().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    remove_sorted = mass_before >= p  # the first token has mass_before 0 < p: always kept
    remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
    return logits.masked_fill(remove, -math.inf)


def min_p(logits: Tensor, p: float) -> Tensor:
    """Min-p filtering (Nguyen et al. 2024, https://arxiv.org/abs/2407.01082).

    Keeps the tokens whose probability is >= p * (the largest probability).
    logits: (..., V) -> (..., V).
    """
    p = check_float("min_p", p, min=0.0, max=1.0)
    # prob_i >= p * prob_max  <=>  logit_i - logit_max >= log(p); no softmax needed
    gap = logits - logits.amax(dim=-1, keepdim=True)
    threshold = math.log(p) if p > 0 else -math.inf
    return logits.masked_fill(gap < threshold, -math.inf)


def top_a(logits: Tensor, a: float, power: float = 2.0) -> Tensor:
    """Top-a filtering (BlinkDL's RWKV sampler): keep tokens with prob >= a * prob_max ** power.

    With power=2 a confident distribution (prob_max near 1) cuts hard and a flat one keeps many
    tokens; power=1 turns it into min-p. The most probable token is always kept.
    logits: (..., V) -> (..., V).
    """
    a = check_float("top_a", a, min=0.0, max=1.0)
    power = check_float("power", power, min=1.0)  # >= 1 keeps the top token
    probs = logits.double().softmax(dim=-1)  # (..., V)
    limit = a * probs.amax(dim=-1, keepdim=True) ** power
    return logits.masked_fill(probs < limit, -math.inf)
