"""Partial masking of bytes for the ablation (issue 11): each byte is `parts` digits in base
`base` (base ** parts = 256), and every digit is masked on its own, so a position can be fully
masked, fully visible or partly known (MDM-Prime, Chao et al. 2025, arXiv 2505.18495).

The network sees one token per byte position: the state of its digits, each a value or masked,
as one id in [0, (base + 1) ** parts). It returns one logit per byte value (`logits_dim=256`);
the digits that are visible rule out the byte values that disagree with them, and a masked digit's
prediction is the marginal of the remaining joint distribution.

The bound is the MDLM NELBO of the sequence of L * parts digits (the any-order bound in time
form, each digit masked independently with probability t, weight 1/t), which bounds the bytes'
NLL because bytes and digit strings are in one-to-one correspondence; it is reported per byte.
Training here uses the recipe's mean CE with bell-shaped counts, now over the digits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from demask.modes import eval_mode
from demask.objectives.masked import (
    bell_mass,
    count_masks,
    draw_masks,
    masked_loss,
    mdlm_weight,
    midpoint_times,
)
from demask.schedules import get_schedule


def digit_base(parts: int) -> int:
    """The base of `parts` digits per byte (256 ** (1 / parts): 16 for 2, 4 for 4, 2 for 8)."""
    return round(256 ** (1 / parts))


def num_states(base: int, parts: int) -> int:
    """Input ids of a position: every digit a value or masked."""
    return (base + 1) ** parts


class PartialMasking(nn.Module):
    """A masked model of bytes (B, L) whose noise masks the bytes' base-`base` digits one by one.

    net: ids (B, L) in [0, num_states(base, parts)) -> logits (B, L, base ** parts).
    """

    digits: Tensor  # (256, P) the digits of every byte value, most significant first
    place: Tensor  # (P,) the place value of each digit's state in an input id

    def __init__(self, net: nn.Module, base: int = 16, parts: int = 2):
        super().__init__()
        if base**parts != 256:
            raise ValueError(f"base ** parts must be 256 (bytes), got {base} ** {parts}")
        self.net, self.base, self.parts = net, base, parts
        values = torch.arange(base**parts)
        powers = base ** torch.arange(parts - 1, -1, -1)
        self.register_buffer("digits", (values[:, None] // powers) % base, persistent=False)
        self.register_buffer("place", (base + 1) ** torch.arange(parts), persistent=False)
        self.schedule = get_schedule("linear")

    def state_ids(self, x: Tensor, hidden: Tensor) -> Tensor:
        """ids (B, L) of bytes x (B, L) with the digits `hidden` (B, L, P) masked."""
        d = self.digits[x].masked_fill(hidden, self.base)  # (B, L, P), base = masked
        return (d * self.place).sum(-1)

    def digit_nats(self, x: Tensor, hidden: Tensor) -> Tensor:
        """(B, L, P) -log p(digit | the visible digits) at the hidden digits, 0 elsewhere."""
        logits = self.net(self.state_ids(x, hidden)).float()  # (B, L, 256)
        true = self.digits[x]  # (B, L, P)
        agree = self.digits[None, None] == true[:, :, None, :]  # (B, L, 256, P)
        allowed = (agree | hidden[:, :, None, :]).all(-1)  # (B, L, 256)
        logp = logits.masked_fill(~allowed, -math.inf).log_softmax(-1)
        marg = torch.logsumexp(logp[..., None].masked_fill(~agree, -math.inf), dim=2)  # (B,L,P)
        return -marg * hidden

    def forward(self, x: Tensor) -> Tensor:
        """The training loss: mean over rows of the row's mean CE over its masked digits, the
        counts of masked digits bell-shaped (the recipe's `train_masking="bell"`)."""
        b, n = x.shape
        fillable = torch.ones(b, n * self.parts, dtype=torch.bool, device=x.device)
        mask, counts, _ = count_masks(fillable, mass=bell_mass)
        nats = self.digit_nats(x, mask.view(b, n, self.parts))  # (B, L, P)
        rows = torch.arange(b, device=x.device)
        return masked_loss(nats.sum((1, 2)), rows, b, n * self.parts, None, counts)

    @torch.no_grad()
    def likelihood_bits(self, x: Tensor, *, num_times: int | None = None) -> tuple[Tensor, int]:
        """(NELBO bits summed over the batch, bytes scored): the digits' MDLM bound at the
        midpoint times, one Bernoulli(t) draw of digit masks each, weight 1/t."""
        b, n = x.shape
        times = midpoint_times(num_times or 32, device=x.device)
        weights = mdlm_weight(self.schedule, times) / len(times)
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        with eval_mode(self):
            for t, w in zip(times, weights):
                hidden = draw_masks(t.expand(b), (b, n * self.parts), device=x.device)
                total += self.digit_nats(x, hidden.view(b, n, self.parts)).sum().double() * w
        return total / math.log(2), x.numel()


class BytesAsStates(nn.Module):
    """tokens (B, L) with 256 for a masked byte -> the net's logits (B, L, 256), every digit of a
    masked byte masked (for the harness's cross-entropy at 5% masked bytes)."""

    def __init__(self, model: PartialMasking):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        m = self.model
        masked = x == 256
        hidden = masked[..., None].expand(*x.shape, m.parts)
        return m.net(m.state_ids(x.masked_fill(masked, 0), hidden))
