"""A schedule from any callable t -> mask ratio, with its derivative found automatically."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_EPS = 1e-4  # half-width of the central finite difference (in float64)


class CallableSchedule:
    """m(t) = fn(t) for a user callable (tensor in, tensor or float out).

    The derivative is taken by autograd when `fn` is built from torch operations, and otherwise
    by a float64 central finite difference (one-sided at the ends of [0, 1]). A callable that only
    accepts Python floats is applied element by element.
    """

    name = "callable"

    def __init__(self, fn: Callable[[Any], Any]):
        if not callable(fn):
            raise TypeError(f"schedule must be 'linear', 'cosine' or a callable, got {fn!r}")
        self.fn = fn

    def _call(self, t: Tensor) -> Tensor:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.fn(t)
        except (TypeError, ValueError, RuntimeError):  # a float-only callable (math.cos ...)
            out = None
        if not isinstance(out, Tensor) or out.shape != t.shape:
            flat = [float(self.fn(float(v))) for v in t.detach().flatten().tolist()]
            out = torch.tensor(flat, dtype=t.dtype, device=t.device).reshape(t.shape)
        return out.to(t.dtype)

    def mask_ratio(self, t: Tensor) -> Tensor:
        return self._call(t).clamp(0.0, 1.0)

    def mask_ratio_derivative(self, t: Tensor) -> Tensor:
        t64 = t.detach().double()
        with torch.enable_grad():
            leaf = t64.clone().requires_grad_(True)
            out = self._call(leaf)
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out.sum(), leaf)
                return grad.clamp_min(0.0).to(t.dtype)
        lo, hi = (t64 - _EPS).clamp(min=0.0), (t64 + _EPS).clamp(max=1.0)
        with torch.no_grad():
            slope = (self._call(hi) - self._call(lo)) / (hi - lo)
        return slope.clamp_min(0.0).to(t.dtype)

    def __repr__(self) -> str:
        return f"CallableSchedule({self.fn!r})"
