"""Dilated order for text: each step reveals positions spread evenly along the sequence.

Luxembourg et al. 2025, "Plan for Speed: Dilated Scheduling for Masked Diffusion Language
Models" (DUS), https://arxiv.org/abs/2506.19037. Neighbouring tokens depend on each other most,
so the tokens sampled together in one step (independently, given the context) should lie far
apart. Positions are revealed in the 1-D low-discrepancy order (van der Corput, base 2: 0, N/2,
N/4, 3N/4, ...), so every step's tokens fall between those already revealed and halve the gaps.
The count per step is the schedule's; the predictions play no part in which positions are
revealed. It is the Halton order of a canvas with one row (the `halton` rule lays a square canvas
for images).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from demask.samplers.base import Proposal, StepInfo
from demask.samplers.halton import canvas_length, reveal_in_order, shared_order


@dataclass
class DilatedRule:
    exact_counts = True
    uses_critic = False
    can_remask = False
    always_remask = False

    def select(self, proposal: Proposal, info: StepInfo) -> Tensor:
        n = canvas_length(proposal, info)
        return reveal_in_order(dilated_order(n), proposal, info)


def dilated_order(seq_len: int) -> Tensor:
    """(seq_len,) long: rank[p] = the step order of position p (0 first): the Halton order of a
    one-row canvas, cached per process (`shared_order`), so read it, never write it."""
    return shared_order(seq_len, seq_len)
