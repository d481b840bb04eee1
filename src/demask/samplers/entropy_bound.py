"""Entropy-bounded unmasking (EB-sampler, Ben-Hamu et al. 2025, arXiv 2505.24857).

The masked candidates of a row are taken in confidence order (probability of the sampled token,
highest first); the largest prefix U with sum_{i in U} H_i - max_{i in U} H_i <= `gamma` is
revealed, H_i being the entropy (nats) of position i's prediction. The left side never decreases
as U grows, so the set is a prefix, and it always holds the first candidate. gamma = 0 reveals
one token per step (plus zero-entropy ones); larger gamma trades error for fewer network calls.
As in `ThresholdRule`, the schedule's count bounds what stays masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from demask._checks import check_float
from demask.samplers.base import (
    Proposal,
    StepInfo,
    keep_masked_below,
    prediction_entropy,
    row_order,
)


@dataclass
class EntropyBoundRule:
    gamma: float = 0.1

    exact_counts = False
    uses_critic = False
    can_remask = False
    always_remask = False

    def __post_init__(self) -> None:
        check_float("gamma", self.gamma, min=0.0)

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        rows, masked = proposal.rows, proposal.was_masked
        confidence = proposal.token_probs.masked_fill(~masked, -1.0)  # (M,)
        entropy = prediction_entropy(proposal.probs).double().masked_fill(~masked, 0.0)
        if rows.numel() == 0:
            return torch.zeros_like(masked)
        # by row, then by decreasing confidence; prefix sums and maxima inside each row
        order, rank = row_order(-confidence, rows, info.batch_size)
        h, r = entropy[order], rows[order]
        total = h.cumsum(0)
        first = torch.arange(order.numel(), device=rows.device) - rank  # each row's first index
        running = total - torch.cat([total.new_zeros(1), total])[first]  # sums inside a row
        offset = r.to(h.dtype) * (h.max() + 1.0)  # rows' values never mix in the running max
        running_max = (h + offset).cummax(0).values - offset
        reveal = torch.zeros_like(masked)
        reveal[order] = running - running_max <= self.gamma
        return keep_masked_below(reveal & masked, confidence, proposal, info)
