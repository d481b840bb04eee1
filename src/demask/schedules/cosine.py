"""Cosine schedule: m(t) = sin(pi t / 2), the seed's 'cosine' cos(pi p / 2) at progress p = 1 - t."""

from __future__ import annotations

import math

import torch
from torch import Tensor


class CosineSchedule:
    """m(t) = sin(pi t / 2), m'(t) = (pi / 2) cos(pi t / 2).

    MaskGIT's cosine schedule (Chang et al. 2022, https://arxiv.org/abs/2202.04200): few tokens
    are revealed in the first steps and many in the last ones.
    """

    name = "cosine"

    def mask_ratio(self, t: Tensor) -> Tensor:
        return torch.sin(t * (math.pi / 2))

    def mask_ratio_derivative(self, t: Tensor) -> Tensor:
        return (torch.cos(t * (math.pi / 2)) * (math.pi / 2)).clamp_min(0.0)  # cos(pi/2) ~ -4e-8

    def __repr__(self) -> str:
        return "CosineSchedule()"
