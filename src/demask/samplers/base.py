"""The contract of masked decoding: the state, the schedule's times, and the reveal rules.

A masked sampler (`demask.samplers.masked.MaskedSampler`) turns the network's logits at its
candidate positions, the current `MaskedState` and the step's `StepTimes` into the next state. It
draws a token for every candidate (temperature, top-k) and asks its `RevealRule` which candidates
are masked after the step. Rules never call a model: a token critic's scores arrive in
`Proposal.critic`, computed from the critic the loop hands to the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "Logits",
    "MaskedState",
    "Proposal",
    "RevealRule",
    "StepInfo",
    "StepTimes",
    "keep_masked_below",
    "mask_least_confident",
    "per_row_rank",
    "row_order",
    "prediction_entropy",
]

_COUNT_EPS = 1e-9  # floor(L * m) in float64 absorbs rounding such as sin(pi / 6) * 64 = 31.99...


@dataclass(frozen=True)
class MaskedState:
    """The canvas: `tokens` (B, N), mask_id where still masked; `fillable` (B, N) bool are the
    positions the decoder fills (the given tokens and a dropped condition are not fillable)."""

    tokens: Tensor  # (B, N) long
    fillable: Tensor  # (B, N) bool
    mask_id: int

    @property
    def masked(self) -> Tensor:
        """(B, N) bool: fillable positions that still hold mask_id."""
        return self.fillable & (self.tokens == self.mask_id)

    def with_tokens(self, tokens: Tensor) -> MaskedState:
        return replace(self, tokens=tokens)


@dataclass(frozen=True)
class StepTimes:
    """Where step `step` (1..steps) sits in the schedule: the mask ratio before and after it."""

    step: int
    steps: int
    ratio_before: float  # m(s): mask ratio at the current time
    ratio_after: float  # m(t): mask ratio after the step (0 at the last step)

    @property
    def anneal(self) -> float:
        """(steps - step) / steps: 1 - progress, the seed's temperature and noise factor."""
        return (self.steps - self.step) / self.steps

    def num_masked_after(self, fillable: Tensor) -> Tensor:
        """(B,) long: floor(F_b * m(t)), the exact masked count after the step (F_b fillable)."""
        count = torch.floor(fillable.double() * self.ratio_after + _COUNT_EPS).long()
        return count.clamp(min=0).minimum(fillable)


@dataclass(frozen=True)
class Logits:
    """The network's prediction at the candidate positions (rows, cols) of a state."""

    rows: Tensor  # (M,) long
    cols: Tensor  # (M,) long
    values: Tensor  # (M, V) float logits


@dataclass
class Proposal:
    """The candidates of one step, flattened over the batch (M candidates)."""

    rows: Tensor  # (M,) long: batch row of each candidate
    cols: Tensor  # (M,) long: position of each candidate
    was_masked: Tensor  # (M,) bool: masked before the step (else a revealed token, re-maskable)
    tokens: Tensor  # (M,) long: the token placed if the candidate ends up revealed
    probs: Tensor  # (M, K) the filtered predictive distribution (K = kept vocabulary entries)
    token_probs: Tensor  # (M,) probability of `tokens` under `probs` (0 if filtered out)
    critic: Tensor | None = None  # (M,) token-critic score, higher = more likely wrong (+ noise)


@dataclass
class StepInfo:
    """What a rule needs of the step besides the proposal."""

    batch_size: int
    num_masked_after: Tensor  # (B,) long: floor(fillable_b * m(t_next)), the exact-count target
    ratio_before: float  # m(s)
    ratio_after: float  # m(t)
    generator: torch.Generator | None = None
    seq_len: int = 0  # N, the canvas length (rules with a spatial order use it)


class RevealRule(Protocol):
    """Which candidates are masked after a step: `select` returns (M,) bool, True = masked.

    Attributes tell the sampler what to prepare:
      exact_counts: the masked count per row after each step is `StepInfo.num_masked_after`.
      uses_critic: the token critic's scores (when a critic exists) rank the candidates.
      can_remask: revealed tokens are candidates when the wrapper allows re-masking them.
      always_remask: revealed tokens are always candidates (the rule re-masks by design).
    """

    exact_counts: bool
    uses_critic: bool
    can_remask: bool
    always_remask: bool

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor: ...


def mask_least_confident(
    confidence: Tensor, rows: Tensor, counts: Tensor, eligible: Tensor | None = None
) -> Tensor:
    """Mark, in every row, the `counts[row]` candidates of lowest confidence (ties: lower index).

    confidence: (M,) float, rows: (M,) long, counts: (B,) long -> (M,) bool. Candidates where
    `eligible` (M,) bool is False are never marked (revealed tokens of a non-re-masking rule).
    """
    if confidence.numel() == 0:
        return torch.zeros_like(rows, dtype=torch.bool)
    if eligible is not None:
        confidence = confidence.masked_fill(~eligible, torch.inf)
    order, rank = row_order(confidence, rows, counts.numel())
    out = torch.zeros_like(rows, dtype=torch.bool)
    out[order] = rank < counts[rows[order]]
    return out if eligible is None else out & eligible


def row_order(score: Tensor, rows: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """`order` (M,): candidates grouped by row, ascending score inside a row (ties: lower index);
    `rank` (M,): the place of order[i] inside its row."""
    order = score.argsort(stable=True)
    order = order[rows[order].argsort(stable=True)]
    per_row = torch.bincount(rows, minlength=batch)  # (B,)
    starts = per_row.cumsum(0) - per_row  # (B,) first index of each row in `order`
    rank = torch.arange(order.numel(), device=rows.device) - starts[rows[order]]
    return order, rank


def per_row_rank(score: Tensor, rows: Tensor, batch: int) -> Tensor:
    """(M,) long: 0 for the highest score of its row, 1 for the next, ... (ties: lower index)."""
    order, rank = row_order(-score, rows, batch)
    out = torch.empty_like(rank)
    out[order] = rank
    return out


def keep_masked_below(
    reveal: Tensor, confidence: Tensor, proposal: Proposal, info: StepInfo
) -> Tensor:
    """The adaptive rules' common end: reveal the candidates of `reveal` (M,) bool, and more where
    the schedule asks for more (its count after the step is an upper bound on the masked), and at
    least one per row that has a masked candidate. Revealed candidates are never marked.

    Returns (M,) bool, True = masked after the step; the ones kept masked are the least confident.
    """
    rows, masked = proposal.rows, proposal.was_masked
    b = info.batch_size
    masked_now = torch.bincount(rows[masked], minlength=b)  # (B,)
    wanted = torch.bincount(rows[masked & ~reveal], minlength=b)  # (B,) masked after `reveal`
    count = wanted.minimum(info.num_masked_after).minimum((masked_now - 1).clamp(min=0))
    return mask_least_confident(confidence, rows, count, masked)


def prediction_entropy(probs: Tensor) -> Tensor:
    """(M,) entropy in nats of each row of probs (M, K)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
