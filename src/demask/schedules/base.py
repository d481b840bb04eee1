"""The schedule contract, written once.

Diffusion time t in [0, 1]: t = 0 is clean, t = 1 is fully masked. `mask_ratio(t)` is the
probability that a token is masked at time t (0 at t = 0, 1 at t = 1, non-decreasing) and
`mask_ratio_derivative(t)` its derivative (>= 0). Both take and return float tensors of any shape.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Schedule"]


@runtime_checkable
class Schedule(Protocol):
    def mask_ratio(self, t: Tensor) -> Tensor: ...

    def mask_ratio_derivative(self, t: Tensor) -> Tensor: ...
