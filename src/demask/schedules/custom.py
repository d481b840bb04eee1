"""A schedule from any callable, checked when it is built, with its derivative found automatically."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_EPS = 1e-4  # half-width of the central finite difference (in float64)
_GRID = 257  # the check evaluates the callable at k / 256: dyadic, so 1 - (1 - x) == x exactly
_TOL = 1e-6  # rounding allowed in the check (a callable computing in float32)


class CallableSchedule:
    """m(t) = fn(t) for a user callable (tensor in, tensor or float out).

    progress=False: fn speaks the package convention, fn(t) is the mask ratio at time t
    (fn(0) = 0 clean, fn(1) = 1 fully masked). progress=True: fn is the seed's `schedule`, the
    mask ratio at generation progress p = 1 - t (fn(0) = 1 at the start, fn(1) = 0 at the end), and
    m(t) = fn(1 - t).

    The callable is checked on a grid of 257 points when the schedule is built: finite values in
    [0, 1], the right values at both ends and monotone; a bad one raises ValueError naming
    `schedule`. (Without the check a reversed or constant schedule trains to loss 0 and gives a
    NELBO of 0 bits: a false likelihood.)

    The derivative is taken by autograd when `fn` is built from torch operations, and otherwise
    by a float64 central finite difference (one-sided at the ends of [0, 1]). A callable that only
    accepts Python floats is applied element by element.
    """

    name = "callable"

    def __init__(self, fn: Callable[[Any], Any], *, progress: bool = False):
        if not callable(fn):
            raise TypeError(f"schedule must be 'linear', 'cosine' or a callable, got {fn!r}")
        self.fn = fn
        self.progress = bool(progress)
        self._check()

    def _call(self, t: Tensor) -> Tensor:
        u = 1 - t if self.progress else t  # the callable's own argument
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = self.fn(u)
        except (TypeError, ValueError, RuntimeError):  # a float-only callable (math.cos ...)
            out = None
        if not isinstance(out, Tensor) or out.shape != t.shape:
            flat = [float(self.fn(float(v))) for v in u.detach().flatten().tolist()]
            out = torch.tensor(flat, dtype=t.dtype, device=t.device).reshape(t.shape)
        return out.to(t.dtype)

    def _check(self) -> None:
        """Raise ValueError naming `schedule` unless fn is a valid mask-ratio schedule."""
        arg = "p" if self.progress else "t"
        x = torch.linspace(0, 1, _GRID, dtype=torch.float64)  # the callable's argument
        try:
            with torch.no_grad():
                v = self._call(1 - x if self.progress else x)  # v[i] = fn(x[i])
        except Exception as err:
            raise ValueError(
                f"schedule could not be evaluated at {arg} in [0, 1]: {type(err).__name__}: {err}"
            ) from err

        def at(i: int) -> str:
            return f"schedule({x[i].item():g}) = {v[i].item():g}"

        bad = (~torch.isfinite(v)).nonzero()
        if len(bad):
            raise ValueError(f"schedule must return finite mask ratios, got {at(int(bad[0]))}")
        bad = ((v < -_TOL) | (v > 1 + _TOL)).nonzero()
        if len(bad):
            raise ValueError(f"schedule must return mask ratios in [0, 1], got {at(int(bad[0]))}")
        masked, clean = (0, -1) if self.progress else (-1, 0)  # indices of the two ends
        if abs(v[masked].item() - 1) > _TOL or abs(v[clean].item()) > _TOL:
            hint = ""
            if abs(v[masked].item()) <= _TOL and abs(v[clean].item() - 1) <= _TOL:
                hint = " (the direction is reversed)"
            raise ValueError(
                f"schedule must give mask ratio 1 at {arg}={x[masked].item():g} (fully masked) "
                f"and 0 at {arg}={x[clean].item():g} (clean), got {at(masked)} and "
                f"{at(clean)}{hint}"
            )
        step = v.diff() if self.progress else -v.diff()  # > 0 where the wrong way
        bad = (step > _TOL).nonzero()
        if len(bad):
            i = int(bad[0])
            way = "non-increasing in p" if self.progress else "non-decreasing in t"
            raise ValueError(f"schedule must be {way}, got {at(i)} and {at(i + 1)}")

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
        return f"CallableSchedule({self.fn!r}, progress={self.progress})"
