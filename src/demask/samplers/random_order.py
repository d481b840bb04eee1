"""LLaDA random remasking (Nie et al. 2025, https://arxiv.org/abs/2502.09992).

A uniformly random subset of the still-masked positions stays masked, exactly as many as the
schedule says; the predictions play no part in which positions are revealed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from demask.samplers.base import Proposal, StepInfo, mask_least_confident


class RandomRule:
    exact_counts = True
    uses_critic = False
    can_remask = False
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        scores = torch.rand(
            proposal.rows.shape, generator=info.generator, device=proposal.rows.device
        )  # (M,) a random order
        return mask_least_confident(
            scores, proposal.rows, info.num_masked_after, proposal.was_masked
        )
