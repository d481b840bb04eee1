"""ReMDM remasking (Wang et al. 2025, "Remasking Discrete Diffusion Models with Inference-Time
Scaling", arXiv 2503.00307), the "cap" schedule of the remasking probability.

Going from mask ratio m_s to m_t < m_s (alpha = 1 - m, the probability that a token is clean),
each revealed token is masked again with probability sigma = min(eta, m_t / alpha_s), and each
masked token is revealed with probability (alpha_t - (1 - sigma) alpha_s) / m_s, which keeps the
marginals of the MDLM forward process; eta = 0 is MDLM's ancestral sampler. More steps give more
chances to correct a token: quality that grows with inference compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from demask._checks import check_float
from demask.samplers.base import Proposal, StepInfo


@dataclass
class ReMDMRule:
    eta: float = 0.02

    exact_counts = False
    uses_critic = False
    can_remask = True
    always_remask = True

    def __post_init__(self) -> None:
        check_float("eta", self.eta, min=0.0, max=1.0)

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        m_s, m_t = info.ratio_before, info.ratio_after
        alpha_s, alpha_t = 1.0 - m_s, 1.0 - m_t
        sigma = min(self.eta, m_t / alpha_s) if alpha_s > 0 else 0.0
        reveal = (alpha_t - (1.0 - sigma) * alpha_s) / m_s if m_s > 0 else 1.0
        reveal = min(1.0, max(0.0, reveal))
        u = torch.rand(proposal.rows.shape, generator=info.generator, device=proposal.rows.device)
        stays = u >= reveal  # masked candidates that stay masked
        goes_back = u < sigma  # revealed candidates masked again
        return torch.where(proposal.was_masked, stays, goes_back)
