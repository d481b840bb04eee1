"""MaskGIT confidence remasking (the seed default).

Chang et al. 2022, MaskGIT, https://arxiv.org/abs/2202.04200; Ghazvininejad et al. 2019,
Mask-Predict, https://arxiv.org/abs/1904.09324. The least confident candidates (lowest probability
of the placed token, or highest token-critic score when a critic exists; Lezama et al. 2022,
https://arxiv.org/abs/2209.04439) stay masked, exactly as many as the schedule says.
"""

from __future__ import annotations

from torch import Tensor

from demask.samplers.base import Proposal, StepInfo, mask_least_confident


class ConfidenceRule:
    exact_counts = True
    uses_critic = True
    can_remask = True
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        if proposal.critic is not None:
            confidence = -proposal.critic  # (M,)
        else:
            confidence = proposal.token_probs  # (M,)
        return mask_least_confident(confidence, proposal.rows, info.num_masked_after)
