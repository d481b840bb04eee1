"""Initialisation of the seed backbone (`TransformerWrapper`): what every weight starts as, and why.

Chosen by the ablation in benchmarks/RESULTS.md ("ablation"): GPT-2's small normal weights and its
scaled residual projections. The position table of an attention bias (`demask.model.positions`)
starts as unit sinusoids, with equal query and key projections. (Sinusoids added to the
embeddings, at their scale or larger, with or without equal query and key projections in the
blocks, were tried there and did not make the absolute-position masked model use its context.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from demask.model.positions import sinusoids

INIT_STD = 0.02  # std of the initial weights (GPT-2)


def init_weights(net: Any) -> None:
    """Initialise a `TransformerWrapper` in place.

    - Every Linear and Embedding weight N(0, 0.02), biases 0 (GPT-2): near-uniform first logits.
    - The projections that write into the residual stream (attention and feed-forward outputs)
      N(0, 0.02 / sqrt(2 * depth)) (GPT-2, Radford et al. 2019): the stream's variance does not
      grow with depth and the token embeddings stay visible through it; for masked models this
      was worth 4.6% NELBO at a small budget. With the layers' `zero_init_branch_output`,
      those projections start at zero instead: every block starts as the identity.
    """
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    init_position_bias(net)
    layers = net.attn_layers
    std = INIT_STD / math.sqrt(2 * layers.depth)
    for block in layers.blocks:
        outs = [block.attn.to_out, block.ff.proj_out]
        if block.cross_attn is not None:
            outs.append(block.cross_attn.to_out)
        for lin in outs:
            if layers.zero_init_branch_output:
                nn.init.zeros_(lin.weight)
            else:
                nn.init.normal_(lin.weight, std=std)


def init_position_bias(net: Any) -> None:
    """The position table of an attention bias as unit sinusoids, its query and key projections
    equal (`demask.model.positions`); nothing when the net has no such bias."""
    if net.abs_pos_attn is None:
        return
    with torch.no_grad():
        net.abs_pos_emb.weight.copy_(sinusoids(*net.abs_pos_emb.weight.shape))
    net.abs_pos_attn.reset_parameters()
