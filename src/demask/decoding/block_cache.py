"""Key/value caches for block decoding of a masked model (Fast-dLLM, Wu et al. 2025, arXiv
2505.22618, "approximate KV cache" and "dual cache").

While block [lo, hi) is being demasked, the tokens left of it (the prefix) do not change, nor do
the still-masked blocks right of it (the suffix). The first network call of a block is a full
forward that records every layer's keys and values of the prefix ("prefix" cache), or of the
prefix and the suffix ("dual" cache); the block's later calls run only the block and the suffix
("prefix") or only the block ("dual") as queries, attending to the recorded keys and values.

Approximate for a bidirectional net: past the first layer a prefix position's keys depend on the
block's tokens, which change inside the block, so the recorded keys go stale (Fast-dLLM measures
the loss as small). Exact where they cannot depend on the block: a one-layer net (its keys are a
function of each position's own token), or a causal net (positions see only their left). The tests
check both against the uncached decoder.

This module drives the net's own layers (`net.attn_layers`) with the model's static `KVCache` of
capacity N (the canvas), built non-causal for a bidirectional net: the first call of a block
writes every position's keys and values; a later call writes those of the positions it computes
(the block, and for "prefix" the suffix too) and attends over all N slots, the others as recorded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from demask.denoiser import Denoiser, self_cond_embeds
from demask.model.kv_cache import KVCache

__all__ = ["CACHES", "CachedDenoiser"]

CACHES = ("prefix", "dual")


class CachedDenoiser(Denoiser):
    """A `Denoiser` whose calls inside a block reuse the keys and values recorded at its start.

    `start_block(lo, hi)` begins block [lo, hi); `cache` is "prefix" or "dual". The embeddings
    returned outside the computed range are stale (the previous pass's); the loop reads only the
    block's candidates, which lie inside it.
    """

    def __init__(self, *args: Any, cache: str = "prefix", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
        if getattr(self.net.attn_layers, "cross_attend", False):
            raise ValueError("a block cache does not support cross-attending layers")
        shift = getattr(self.net.attn_layers, "shift_tokens", 0)
        if shift:
            raise ValueError(
                f"cache={cache!r} does not support a net with shift_tokens={shift}: a cached call "
                "computes only the block's positions, and each reads its neighbours' inputs; "
                "pass cache=None"
            )
        self.dual = cache == "dual"
        self.block: tuple[int, int] | None = None
        self.records: list[KVCache | None] = [None, None]  # per branch (cond, uncond)
        self.last: list[Tensor | None] = [None, None]

    def start_block(self, lo: int, hi: int) -> None:
        self.block = (lo, hi)
        self.records = [None, None]

    def hidden(self, seq: Tensor, branch: int = 0) -> Tensor:
        if self.block is None:
            return super().hidden(seq, branch)
        rec = self.records[branch]
        n = seq.shape[1]
        lo, hi = self.block
        if rec is None:  # the block's first call: a full forward that records every position
            net: Any = self.net
            causal = bool(getattr(net.attn_layers, "causal", False))
            rec = net.new_cache(seq.shape[0], n, seq.device, bidirectional=not causal)
            self.records[branch] = rec
            q0, q1, read = 0, n, False
        else:
            q0, q1, read = lo, (hi if self.dual else n), True
        prev = self.prev_emb[branch]
        sum_embeds = self_cond_embeds(self.to_self_cond, prev)
        if sum_embeds is not None:
            sum_embeds = sum_embeds[:, q0:q1]
        pos = torch.arange(q0, q1, device=seq.device)
        step = (rec, pos, read, rec.capacity)  # every slot: the first call wrote them all
        part = _encode(self.net, seq[:, q0:q1], pos, sum_embeds, step)  # (B, Q, dim)
        self.forwards += 1
        full = self.last[branch]
        if full is None or q0 == 0 and q1 == seq.shape[1]:
            full = part if q1 - q0 == seq.shape[1] else _pad(part, q0, seq.shape[1])
        else:
            full = full.clone()
            full[:, q0:q1] = part
        self.last[branch] = full
        if self.to_self_cond is not None:
            self.prev_emb[branch] = full
        return full


def _pad(part: Tensor, q0: int, n: int) -> Tensor:
    full = part.new_zeros(part.shape[0], n, part.shape[2])
    full[:, q0 : q0 + part.shape[1]] = part
    return full


def _encode(
    net: nn.Module, x: Tensor, pos: Tensor, sum_embeds: Tensor | None, cache: Any
) -> Tensor:
    """The net's embeddings (B, Q, dim) of tokens x (B, Q) at positions pos (Q,), through
    `cache` (the layers' (KVCache, input_pos, read?, slots read) tuple): the net's own embedding
    step, then its attention layers; tests compare a full call with `net(x)`."""
    m: Any = net
    h = m._embed(x, pos, int(pos[-1]), sum_embeds)  # (B, Q, dim)
    return m._layers(h, pos, cache=cache)
