"""Linear schedule: m(t) = t (the seed's 'linear', mask ratio 1 - p at progress p = 1 - t)."""

from __future__ import annotations

import torch
from torch import Tensor


class LinearSchedule:
    """m(t) = t, m'(t) = 1: the MDLM weight m'(t) / m(t) is 1 / t.

    Sahoo et al. 2024, https://arxiv.org/abs/2406.07524 (alpha_t = 1 - t).
    """

    name = "linear"

    def mask_ratio(self, t: Tensor) -> Tensor:
        return t.clone()

    def mask_ratio_derivative(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def __repr__(self) -> str:
        return "LinearSchedule()"
