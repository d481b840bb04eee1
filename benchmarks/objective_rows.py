"""Training-loss variants that exist only for the ablation (issue 11, item 3): why mean CE trains
better than the MDLM estimate.

Each variant replaces a demask NonAutoregressiveWrapper's objective (its `_objective`) and keeps
everything else (augmentation, the network call, the scoring):
- `unweighted`: mask counts k ~ q(k) from `count_masks` (with the variant's q), the row's mean
  cross-entropy without the importance weights. With power -1 (q ~ k) its expected gradient is mean
  CE's (a level of k masked tokens counts k times), at a lower variance than mean CE's single draw;
  it is not an estimate of the NELBO.
- `complementary`: antithetic masks. The batch's first half is repeated (so a step sees half as
  many distinct windows, at the same compute); row b + B/2 masks exactly the fillable positions
  that row b leaves visible, so every token of a window is predicted once per pair. The counts and
  weights of `count_masks` keep each row an unbiased NELBO estimate, but for one level: the
  complement of a fully masked window masks nothing, so the complement rows miss the level k = L
  (1/L of the bound, the unigram level) and count an empty level 0 instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import ar_aux
from demask.objectives.masked import (
    MaskedObjective,
    augment_masked,
    bell_mass,
    count_masks,
    masked_loss,
)


def _count_loss(o: MaskedObjective, x: Tensor, cond: Tensor, masks: tuple[Tensor, Tensor, Any],
                predict: Any) -> tuple[Tensor, ...]:  # fmt: skip
    """The objective's tail for given (mask, counts, row weights or None): the augmented input,
    the network call, the mean over rows of the (weighted) row-mean cross-entropy."""
    mask, counts, weights = masks
    inp = augment_masked(x, mask, mask_id=o.mask_id, num_tokens=o.num_tokens,
                         no_replace_prob=o.no_replace_prob,
                         random_token_prob=o.random_token_prob)  # fmt: skip
    ce, logits, rows, cols = predict(inp, mask)
    return masked_loss(ce, rows, x.shape[0], (~cond).sum(-1), weights, counts), logits, rows, cols


@dataclass(frozen=True)
class CountVariant:
    """A count-based masked loss: `weighted` keeps the importance weights, `complementary` pairs
    row b with row b + B/2 (which must hold the same window) under complementary masks."""

    base: MaskedObjective
    mass: Callable[[Tensor], Tensor]  # counts 1..N (float64) -> q unnormalised
    weighted: bool = True
    complementary: bool = False

    def _masks(self, fillable: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not self.complementary:
            return count_masks(fillable, mass=self.mass)
        half = fillable.shape[0] // 2
        first, counts, weights = count_masks(fillable[:half], mass=self.mass)
        second = fillable[half : 2 * half] & ~first
        mask = torch.cat([first, second])
        counts = torch.cat([counts, second.sum(-1)])
        # the complement's count L - k has probability q(k): the same weight
        return mask, counts, torch.cat([weights, weights])

    def nelbo(self, *args: Any, **kwargs: Any) -> Tensor:
        """Scoring is the base objective's NELBO, unchanged."""
        return self.base.nelbo(*args, **kwargs)

    def __call__(self, x: Tensor, cond: Tensor, predict: Any) -> tuple[Tensor, ...]:
        mask, counts, weights = self._masks(~cond)
        masks = (mask, counts, weights if self.weighted else None)
        return _count_loss(self.base, x, cond, masks, predict)


def _repeat_first_half(model: nn.Module) -> None:
    """The model's forward sees each batch as its first half twice (rows b and b + B/2 alike)."""
    forward = model.forward

    def paired(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        half = x.shape[0] // 2
        return forward(torch.cat([x[:half], x[:half]]), *args, **kwargs)

    model.forward = paired  # type: ignore[method-assign]


@dataclass(frozen=True)
class AnnealedVariant:
    """The NELBO reached by a ramp (issue 11, item 3): each mask level k of F gets the weight
    w(k) = (1 - lam) 2k / (F + 1) + lam (mean 1 over k), lam = min(1, progress / ramp_end), so
    training starts on mean CE's weighting (a level counts k times) and ends on the NELBO's
    (every level alike). Counts k ~ w(k) k^-1/2 (the default's k^-1/2 at lam = 1), importance
    weights w(k) / (F q(k)): an unbiased estimate of the lam-weighted loss at every step."""

    base: MaskedObjective
    lam: float

    def nelbo(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.base.nelbo(*args, **kwargs)

    def _level_weight(self, k: Tensor, f: Tensor) -> Tensor:
        return (1 - self.lam) * 2 * k / (f + 1) + self.lam

    def __call__(self, x: Tensor, cond: Tensor, predict: Any) -> tuple[Tensor, ...]:
        fillable = ~cond
        f = fillable.sum(-1).double()
        if bool((f != f[0]).any()):
            raise ValueError("the annealed variant needs every row to have as many fillable tokens")
        mask, counts, weights = count_masks(
            fillable, mass=lambda k: self._level_weight(k, f[0]) * k**-0.5
        )
        weights = weights * self._level_weight(counts.double(), f)
        return _count_loss(self.base, x, cond, (mask, counts, weights), predict)


def _install_annealed(ramp_end: float, model: nn.Module) -> None:
    """The model's objective follows `model.train_progress` (0..1, set by the harness's loop)."""
    make_base: Callable[[], MaskedObjective] = model._objective  # type: ignore[assignment]
    model.train_progress = 0.0  # type: ignore[assignment]

    def objective() -> AnnealedVariant:
        lam = min(1.0, float(model.train_progress) / ramp_end)  # type: ignore[arg-type]
        return AnnealedVariant(make_base(), lam)

    setattr(model, "_objective", objective)  # noqa: B010


def install(name: str, model: nn.Module) -> None:
    """Replace `model`'s training objective by the variant `name` (a key of VARIANTS, ANNEALED
    or `benchmarks.ar_aux.VARIANTS`)."""
    if name in ar_aux.VARIANTS:
        ar_aux.install(model, *ar_aux.VARIANTS[name])
        return
    if name in ANNEALED:
        _install_annealed(ANNEALED[name], model)
        return
    mass, weighted, complementary = VARIANTS[name]
    make_base: Callable[[], MaskedObjective] = model._objective  # type: ignore[assignment]

    def objective() -> CountVariant:
        return CountVariant(make_base(), mass, weighted, complementary)

    setattr(model, "_objective", objective)  # noqa: B010 (an instance attribute over a method)
    if complementary:
        _repeat_first_half(model)


def _power(p: float) -> Callable[[Tensor], Tensor]:
    return lambda k: k**-p


# name -> (q over counts, importance-weighted, complementary pairs)
VARIANTS: dict[str, tuple[Callable[[Tensor], Tensor], bool, bool]] = {
    "unweighted_pm1": (_power(-1.0), False, False),
    "unweighted_pm2": (_power(-2.0), False, False),
    "unweighted_bell": (bell_mass, False, False),
    "complementary": (_power(0.5), True, True),
    "complementary_p0": (_power(0.0), True, True),
}

# name -> the fraction of training at which the weighting reaches the NELBO's
ANNEALED: dict[str, float] = {"anneal_50": 0.5, "anneal_100": 1.0}
