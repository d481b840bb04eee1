"""Confidence-threshold parallel decoding (Fast-dLLM, Wu et al. 2025, arXiv 2505.22618).

Every masked candidate whose sampled token has probability >= `tau` is revealed, and at least one
per row (the most confident): easy stretches go many tokens per network call, hard ones one. The
schedule's count is kept as an upper bound on what stays masked, so `steps` bounds the number of
network calls; with steps >= the length the rule is Fast-dLLM's as published.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from demask._checks import check_float
from demask.samplers.base import Proposal, StepInfo, keep_masked_below


@dataclass
class ThresholdRule:
    tau: float = 0.9

    exact_counts = False
    uses_critic = False
    can_remask = False
    always_remask = False

    def __post_init__(self) -> None:
        check_float("tau", self.tau, min=0.0, max=1.0)

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        confidence = proposal.token_probs  # (M,)
        return keep_masked_below(confidence >= self.tau, confidence, proposal, info)
