"""The remasking contract shared by every masked-decoding strategy.

One decoding step (demask.decoding.masked) proposes a token for every candidate position (filter +
categorical sample) and hands a `Proposal` and a `StepInfo` to the strategy; the strategy returns
which candidates are masked after the step. Strategies never call a model: a token critic's scores
arrive in `Proposal.critic`, computed by the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Proposal", "Sampler", "StepInfo", "mask_least_confident"]


@dataclass
class Proposal:
    """The candidates of one step, flattened over the batch (M candidates)."""

    rows: Tensor  # (M,) long: batch row of each candidate
    cols: Tensor  # (M,) long: position of each candidate
    was_masked: (
        Tensor  # (M,) bool: masked before this step (else a revealed token that may be re-masked)
    )
    tokens: Tensor  # (M,) long: the token placed if the candidate ends up revealed
    probs: Tensor  # (M, K) the filtered predictive distribution (K = kept vocabulary entries)
    token_probs: Tensor  # (M,) probability of `tokens` under `probs` (0 if filtered out)
    critic: Tensor | None = None  # (M,) token-critic score, higher = more likely wrong (+ noise)


@dataclass
class StepInfo:
    """Where the step sits in the schedule."""

    batch_size: int
    num_masked_after: Tensor  # (B,) long: floor(fillable_b * m(t_next)), the exact-count target
    ratio_before: float  # m(s): mask ratio at the current time
    ratio_after: float  # m(t): mask ratio at the next time (0 at the last step)
    generator: torch.Generator | None = None


class Sampler(Protocol):
    """A remasking strategy: `select` returns (M,) bool, True = masked after this step.

    Attributes tell the loop what to prepare:
      exact_counts: the masked count per row after each step is `StepInfo.num_masked_after`.
      uses_critic: the loop computes token-critic scores (when a critic exists) for this strategy.
      can_remask: candidates include revealed tokens when the wrapper allows re-masking them.
    """

    exact_counts: bool
    uses_critic: bool
    can_remask: bool

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor: ...


def mask_least_confident(
    confidence: Tensor, rows: Tensor, counts: Tensor, eligible: Tensor | None = None
) -> Tensor:
    """Mark, in every row, the `counts[row]` candidates of lowest confidence (ties: lower index).

    confidence: (M,) float, rows: (M,) long, counts: (B,) long -> (M,) bool. Candidates where
    `eligible` (M,) bool is False are never marked (revealed tokens of a non-re-masking strategy).
    """
    if confidence.numel() == 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    if eligible is not None:
        confidence = confidence.masked_fill(~eligible, torch.inf)
    order = confidence.argsort(stable=True)  # ascending confidence
    order = order[rows[order].argsort(stable=True)]  # grouped by row, ascending inside a row
    sorted_rows = rows[order]
    per_row = torch.bincount(rows, minlength=counts.numel())  # (B,)
    starts = per_row.cumsum(0) - per_row  # (B,) first index of each row in `order`
    rank = torch.arange(order.numel(), device=rows.device) - starts[sorted_rows]
    out = torch.zeros_like(rows, dtype=torch.bool)
    out[order] = rank < counts[sorted_rows]
    return out if eligible is None else out & eligible
