"""Entropy remasking: confidence = minus the entropy of the predictive distribution.

Used by Dream 7B (Ye et al. 2025, https://arxiv.org/abs/2508.15487) among others: positions whose
prediction is most spread out stay masked longest.
"""

from __future__ import annotations

from torch import Tensor

from demask.samplers.base import Proposal, StepInfo, mask_least_confident, prediction_entropy


class EntropyRule:
    exact_counts = True
    uses_critic = False
    can_remask = False
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        entropy = prediction_entropy(proposal.probs)  # (M,)
        return mask_least_confident(
            -entropy, proposal.rows, info.num_masked_after, proposal.was_masked
        )
