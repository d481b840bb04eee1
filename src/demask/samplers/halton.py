"""Halton order for image tokens (Besnier et al. 2025, "Halton Scheduler for Masked Generative
Image Transformer", arXiv 2503.17076).

The canvas is a grid of `width` columns (rows of width tokens, raster order). Positions are
revealed in the order of the 2-D Halton sequence (bases 2 and 3) mapped to grid cells, skipping
cells already taken: a low-discrepancy order, so each step's tokens are spread over the image
and far from each other, instead of clustered where the model happens to be confident. The count
per step is the schedule's; the predictions play no part in which positions are revealed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from demask._checks import check_int
from demask.samplers.base import Proposal, StepInfo, mask_least_confident


def _radical_inverse(i: int, base: int) -> float:
    out, f = 0.0, 1.0 / base
    while i > 0:
        i, digit = divmod(i, base)
        out += digit * f
        f /= base
    return out


def halton_order(seq_len: int, width: int) -> Tensor:
    """(seq_len,) long: rank[p] = when position p is revealed in the 2-D Halton order."""
    height = math.ceil(seq_len / width)
    rank = torch.full((seq_len,), -1, dtype=torch.long)
    placed, i = 0, 0
    while placed < seq_len and i < 64 * height * width + 64:
        y = int(_radical_inverse(i, 3) * height)
        x = int(_radical_inverse(i, 2) * width)
        i += 1
        p = y * width + x
        if p < seq_len and rank[p] < 0:
            rank[p] = placed
            placed += 1
    rest = (rank < 0).nonzero().flatten()  # never reached (a guard): raster order
    rank[rest] = torch.arange(placed, placed + rest.numel())
    return rank


@dataclass
class HaltonRule:
    width: int | None = None  # None: a square canvas (isqrt of the length), else one row

    exact_counts = True
    uses_critic = False
    can_remask = False
    always_remask = False

    def __post_init__(self) -> None:
        if self.width is not None:
            check_int("width", self.width, min=1)

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        n = canvas_length(proposal, info)
        width = self.width
        if width is None:
            root = math.isqrt(n)
            width = root if root * root == n else n
        return reveal_in_order(shared_order(n, width), proposal, info)


@lru_cache(maxsize=16)
def shared_order(seq_len: int, width: int) -> Tensor:
    """`halton_order`, computed once per process for each canvas (every generate call builds its
    rule afresh); the rules only read it."""
    return halton_order(seq_len, width)


def canvas_length(proposal: Proposal, info: StepInfo) -> int:
    """N, the canvas length: the step's, else one past the last candidate position."""
    return info.seq_len or (int(proposal.cols.max()) + 1 if proposal.cols.numel() else 1)


def reveal_in_order(rank: Tensor, proposal: Proposal, info: StepInfo) -> Tensor:
    """(M,) bool, True = masked after the step: of the still-masked candidates, those latest in
    `rank` (N,) (rank[p]: when position p is revealed), as many as the schedule says."""
    rank = rank.to(proposal.cols.device)[proposal.cols]  # (M,)
    return mask_least_confident(
        -rank.double(), proposal.rows, info.num_masked_after, proposal.was_masked
    )
