"""Entropy remasking: confidence = minus the entropy of the predictive distribution.

Used by Dream 7B (Ye et al. 2025, https://arxiv.org/abs/2508.15487) among others: positions whose
prediction is most spread out stay masked longest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from demask.samplers.base import Proposal, StepInfo, mask_least_confident


class EntropySampler:
    exact_counts = True
    uses_critic = False
    can_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        probs = proposal.probs  # (M, K)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # (M,)
        return mask_least_confident(
            -entropy, proposal.rows, info.num_masked_after, proposal.was_masked
        )
