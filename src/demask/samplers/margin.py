"""Margin remasking: confidence = top-1 minus top-2 probability of the predictive distribution.

Kim et al. 2025, "Train for the Worst, Plan for the Best", https://arxiv.org/abs/2502.06768 (top
probability margin). Positions where the model hesitates between two tokens stay masked longest.
"""

from __future__ import annotations

from torch import Tensor

from demask.samplers.base import Proposal, StepInfo, mask_least_confident


class MarginRule:
    exact_counts = True
    uses_critic = False
    can_remask = False
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        probs = proposal.probs  # (M, K)
        if probs.shape[-1] == 1:
            margin = probs[:, 0]
        else:
            top2 = probs.topk(2, dim=-1).values  # (M, 2)
            margin = top2[:, 0] - top2[:, 1]
        return mask_least_confident(
            margin, proposal.rows, info.num_masked_after, proposal.was_masked
        )
