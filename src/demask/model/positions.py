"""Learned absolute positions for bidirectional layers, used in attention as well.

An `Encoder` at seq 256 with positions added to the token embeddings (the seed library's form)
does not learn to use its context within a small budget: every masked byte is predicted from the
unigram law (benchmarks/RESULTS.md, "ablation", absolute positions). Its queries at masked
positions share one token, so to prefer its neighbours the net must learn, for every pair of
positions separately, a match between two position vectors that are mixed into the content.

Here the same learned table (`TransformerWrapper.abs_pos_emb`, one row per position) also enters
attention as an untied positional term (TUPE, Ke et al. 2021, arXiv 2006.15595): every head adds
(p_i U_q) . (p_j U_k) / sqrt(d) to its logits, the projections shared by all layers. The table
starts as unit sinusoids and U_k = U_q (the "mimetic" start of Trockman and Kolter 2023, arXiv
2305.09828), so that attention first prefers nearby positions and one shared change of U_q, U_k
moves every pair alike. The table is still added to the token embeddings, scaled to their initial
size (`ADDED_SCALE`): the bias alone would leave a fully masked input the same at every position,
and a larger added part slowed learning (1 seed each, dim 64: CE@5% 2.76 bits at 0.02, 3.02 at
dim^-1/2, 3.83 at 0.3; the bias alone 2.72; rotary 2.98).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from demask.model.layers import Linear


def sinusoids(n: int, d: int) -> Tensor:
    """(n, d) sinusoids of the positions 0..n-1 (Vaswani et al. 2017), at unit std."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    waves = torch.zeros(n, d, dtype=torch.float64)
    waves[:, 0::2] = torch.sin(pos * inv_freq)
    waves[:, 1::2] = torch.cos(pos * inv_freq[: d // 2])
    return (waves / waves.std()).float()


# the table is kept at unit scale for the bias; it is added to the tokens at their initial std
ADDED_SCALE = 0.02


class UntiedPositions(nn.Module):
    """The attention-logit bias of absolute positions: (…, H, Nq, Nk) from position vectors."""

    def __init__(self, table_dim: int, heads: int, pos_dim: int):
        super().__init__()
        self.heads, self.pos_dim = heads, pos_dim
        self.to_qk = Linear(table_dim, 2 * heads * pos_dim, bias=False)

    def reset_parameters(self) -> None:
        """U_q at std 1/sqrt(table_dim), U_k = U_q: each head's bias starts as a scaled kernel
        of the positions' similarity, largest near the query."""
        w = self.to_qk.weight
        half = self.heads * self.pos_dim
        with torch.no_grad():
            w[:half].normal_(std=w.shape[1] ** -0.5)
            w[half:].copy_(w[:half])

    def _project(self, p: Tensor, part: int) -> Tensor:
        """(…, N, E) position vectors -> (…, H, N, pos_dim) queries (part 0) or keys (part 1)."""
        half = self.heads * self.pos_dim
        w = self.to_qk.weight[part * half : (part + 1) * half]
        out = (p @ w.T).unflatten(-1, (self.heads, self.pos_dim))  # (…, N, H, pos_dim)
        return out.transpose(-2, -3)

    def forward(self, p_query: Tensor, p_key: Tensor) -> Tensor:
        """p_query (…, Nq, E), p_key (…, Nk, E) -> logit bias (…, H, Nq, Nk)."""
        q, k = self._project(p_query, 0), self._project(p_key, 1)
        return (q @ k.transpose(-1, -2)) / math.sqrt(self.pos_dim)


# the relative table is stored at this fraction of its use, so that AdamW moves the bias
# REL_BIAS_SCALE times faster than the weights (the ablation's start: benchmarks/RESULTS.md)
REL_BIAS_SCALE = 8.0


class RelativePositions(nn.Module):
    """A learned attention-logit bias of the key's offset from the query, per head, shared by the
    layers (Shaw et al. 2018; T5's, without buckets): b[h, j - i] for offsets within
    +-(max_len - 1), the farthest entry beyond. Starts at zero (the net computes what it would
    without it)."""

    def __init__(self, heads: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.table = nn.Parameter(torch.zeros(heads, 2 * max_len - 1))

    def forward(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """query_pos (…, Nq), key_pos (…, Nk) -> logit bias (…, H, Nq, Nk)."""
        offset = key_pos.unsqueeze(-2) - query_pos.unsqueeze(-1)  # (…, Nq, Nk)
        idx = offset.clamp(1 - self.max_len, self.max_len - 1) + self.max_len - 1
        bias = self.table[:, idx] * REL_BIAS_SCALE  # (H, …, Nq, Nk)
        return bias.movedim(0, -3)
