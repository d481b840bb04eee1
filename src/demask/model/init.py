"""Initialisation of the seed backbone (`TransformerWrapper`): what every weight starts as, and why.

Chosen by the ablation in benchmarks/RESULTS.md ("ablation"): GPT-2's small normal weights, its
scaled residual projections, and sinusoid-initialised learned absolute positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_STD = 0.02  # std of the initial weights (GPT-2)


INIT_STD = 0.02  # std of the initial weights (GPT-2)


def sinusoidal_init_(table: Tensor, std: float) -> Tensor:
    """Fill a learned (positions, dim) table with sinusoids (Vaswani et al. 2017,
    arXiv 1706.03762) scaled to `std`, in place.

    Why: the offset p -> p + k is then a fixed linear map of the table (a rotation per frequency
    pair), so attention by relative position is there from the first step; from a random table
    a masked model must discover it, and at seq 256 it did not within the quality benchmark's
    budget (it stayed at the unigram entropy; benchmarks/RESULTS.md, "ablation"). The table
    stays a learned parameter.
    """
    n, d = table.shape
    pos = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (ceil(d/2),)
    waves = torch.zeros(n, d, dtype=torch.float64)
    waves[:, 0::2] = torch.sin(pos * inv_freq)
    waves[:, 1::2] = torch.cos(pos * inv_freq[: d // 2])
    with torch.no_grad():
        return table.copy_(waves * (std / waves.std()))


def init_weights(net: Any) -> None:
    """Initialise a `TransformerWrapper` in place.

    - Every Linear and Embedding weight N(0, 0.02), biases 0 (GPT-2): near-uniform first logits.
    - The projections that write into the residual stream (attention and feed-forward outputs)
      N(0, 0.02 / sqrt(2 * depth)) (GPT-2, Radford et al. 2019): the stream's variance does not
      grow with depth and the token embeddings stay visible through it; for masked models this
      was worth 4.6% NELBO at a small budget.
    - Learned absolute positions start as sinusoids (`sinusoidal_init_`), stored at unit scale
      (`PositionTable`).
    """
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    layers = net.attn_layers
    std = INIT_STD / math.sqrt(2 * layers.depth)
    for block in layers.blocks:
        outs = [block.attn.to_out, block.ff.proj_out]
        if block.cross_attn is not None:
            outs.append(block.cross_attn.to_out)
        for lin in outs:
            nn.init.normal_(lin.weight, std=std)
    if net.abs_pos_emb is not None:
        sinusoidal_init_(net.abs_pos_emb.table, std=1.0)  # times its scale, INIT_STD


class PositionTable(nn.Module):
    """Learned absolute position embeddings, (max_seq_len, dim), stored at unit scale and
    multiplied by `scale` when used.

    Why: Adam moves every entry by about the learning rate per step whatever its gradient, so a
    table stored at the embeddings' scale (0.02) loses its initial sinusoids to noise within a few
    hundred steps at lr 1e-3; stored at scale 1, the same updates are 50x smaller relative to it
    and the relative-position structure lasts (benchmarks/RESULTS.md, "ablation": with sinusoids
    at 0.02 the seed configuration stayed at the unigram entropy).
    """

    def __init__(self, max_seq_len: int, dim: int, scale: float = INIT_STD):
        super().__init__()
        self.table = nn.Parameter(torch.empty(max_seq_len, dim))
        self.scale = scale
        sinusoidal_init_(self.table, std=1.0)

    def forward(self, pos: Tensor) -> Tensor:  # (...,) int positions -> (..., dim)
        return F.embedding(pos, self.table) * self.scale
