"""Categorical sampling with the Gumbel-max trick, in float64.

Gumbel-max: argmax_i(logit_i / T + g_i) with g_i ~ Gumbel(0, 1) is a draw from softmax(logit / T)
(Gumbel 1954; Maddison et al. 2014, https://arxiv.org/abs/1411.0292). The noise is drawn in float64:
in float32 the uniform draw is quantised near 1, which truncates the Gumbel tail and measurably skews
the probabilities of unlikely tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from demask._checks import check_float

__all__ = ["gumbel_noise", "sample_categorical"]

_TINY = 1e-300  # keeps log(u) finite when the float64 uniform draw is exactly 0


def gumbel_noise(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U(0, 1), drawn in float64 and cast to `dtype`."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return (-torch.log(-torch.log(u.clamp_min_(_TINY)))).to(dtype)


def sample_categorical(
    logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one token per row from softmax(logits / temperature).

    logits: (..., V), entries at -inf are never drawn. temperature 0 returns the argmax.
    Returns (...,) long.

    The logits are shifted by their row maximum first (the draw does not change): then
    (logits - max) / T is <= 0 and cannot overflow to +inf for a tiny T (1e-320 used to turn every
    positive logit into inf, and argmax then picked the first of them). As T -> 0 the non-maximal
    entries go to -inf and exact ties at the maximum stay a uniform draw, the limit of
    softmax(logits / T): a tiny temperature is greedy.
    """
    temperature = check_float("temperature", temperature, min=0.0)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    noise = gumbel_noise(logits.shape, generator=generator, device=logits.device)  # (..., V)
    x = logits.double()
    top = x.amax(dim=-1, keepdim=True)  # (..., 1)
    top = top.masked_fill(~torch.isfinite(top), 0.0)  # rows all -inf, or holding +inf: no shift
    return ((x - top) / temperature + noise).argmax(dim=-1)
