"""LLaDA low-confidence remasking (Nie et al. 2025, https://arxiv.org/abs/2502.09992).

Revealed tokens are never re-masked and no critic is used: of the still-masked positions, the
ones whose sampled token has the lowest predicted probability stay masked, exactly as many as the
schedule says.
"""

from __future__ import annotations

from torch import Tensor

from demask.samplers.base import Proposal, StepInfo, mask_least_confident


class LowConfidenceRule:
    exact_counts = True
    uses_critic = False
    can_remask = False
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        return mask_least_confident(
            proposal.token_probs, proposal.rows, info.num_masked_after, proposal.was_masked
        )
