"""Fast-dLLM's factor rule (Wu et al. 2025, arXiv 2505.22618, the "factor" parallel decoding).

With the masked candidates of a row sorted by confidence c_(1) >= c_(2) >= ..., the largest n with
(n + 1) (1 - c_(n)) < `factor` are revealed (at least one): the more candidates, the more
confident the weakest of them must be. (n + 1) (1 - c_(n)) grows with n, so the set is a prefix.
As in `ThresholdRule`, the schedule's count bounds what stays masked.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from demask._checks import check_float
from demask.samplers.base import Proposal, StepInfo, keep_masked_below, per_row_rank


@dataclass
class FactorRule:
    factor: float = 1.0

    exact_counts = False
    uses_critic = False
    can_remask = False
    always_remask = False

    def __post_init__(self) -> None:
        check_float("factor", self.factor, min=0.0, min_inclusive=False)

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        confidence = proposal.token_probs.masked_fill(~proposal.was_masked, -1.0)  # (M,)
        n = per_row_rank(confidence, proposal.rows, info.batch_size) + 1  # (M,) 1-based
        reveal = (n + 1) * (1.0 - confidence) < self.factor
        return keep_masked_below(reveal, confidence, proposal, info)
