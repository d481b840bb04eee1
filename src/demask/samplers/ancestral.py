"""MDLM ancestral sampling (Sahoo et al. 2024, https://arxiv.org/abs/2406.07524, eq. 7-8).

Going from time s to the next time t < s, every still-masked token is revealed independently with
probability (m(s) - m(t)) / m(s), with the token drawn from the model's prediction; revealed
tokens stay. The number revealed per step is random, so a step may reveal nothing; the loop then
reuses the previous logits instead of calling the network again.
"""

from __future__ import annotations

import torch
from torch import Tensor

from demask.samplers.base import Proposal, StepInfo


class AncestralRule:
    exact_counts = False
    uses_critic = False
    can_remask = False
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        if info.ratio_before <= 0.0:
            return torch.zeros_like(proposal.was_masked)
        stay = min(1.0, max(0.0, info.ratio_after / info.ratio_before))  # m(t) / m(s)
        u = torch.rand(
            proposal.rows.shape, generator=info.generator, device=proposal.rows.device
        )  # (M,)
        return proposal.was_masked & (u < stay)
