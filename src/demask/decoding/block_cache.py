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

This module drives the net's own layers (`net.attn_layers`, with a cache object that speaks the
layers' `begin` / `layer(i).update(k, v)` / `commit` protocol); it changes nothing in demask.model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from demask.denoiser import Denoiser, self_cond_embeds

__all__ = ["CACHES", "CachedDenoiser"]

CACHES = ("prefix", "dual")


class _Recorded:
    """The duck-typed cache handed to `net.attn_layers` for one forward."""

    def __init__(self, lo: int, hi: int, n: int, dual: bool, causal: bool) -> None:
        self.lo, self.hi, self.n, self.dual, self.causal = lo, hi, n, dual, causal
        self.k: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> prefix keys, suffix keys
        self.v: dict[int, tuple[Tensor, Tensor]] = {}
        self.recording = True

    def query_range(self) -> tuple[int, int]:
        if self.recording:
            return 0, self.n
        return self.lo, (self.hi if self.dual else self.n)

    def begin(self, n: int, key_mask: Tensor | None) -> None:
        pass

    def commit(self, n: int) -> None:
        pass

    def layer(self, i: int) -> _LayerView:
        return _LayerView(self, i)

    def mask(self, device: torch.device) -> Tensor | None:
        """(Q, K) bool for a causal net (keys at positions <= the query's), else None. The keys
        are always positions 0..N-1 in order (recorded, or recorded around the queries)."""
        if not self.causal:
            return None
        q0, q1 = self.query_range()
        q_pos = torch.arange(q0, q1, device=device)
        return torch.arange(self.n, device=device)[None, :] <= q_pos[:, None]


class _LayerView:
    def __init__(self, cache: _Recorded, i: int) -> None:
        self.cache, self.i = cache, i

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        c, i = self.cache, self.i
        if c.recording:  # k, v: (B, h, N, D) of the whole canvas
            c.k[i] = (k[:, :, : c.lo], k[:, :, c.hi :])
            c.v[i] = (v[:, :, : c.lo], v[:, :, c.hi :])
            return k, v, c.mask(k.device)
        (pk, sk), (pv, sv) = c.k[i], c.v[i]
        if c.dual:  # k, v: the block's; the suffix's come from the record
            return torch.cat([pk, k, sk], 2), torch.cat([pv, v, sv], 2), c.mask(k.device)
        return torch.cat([pk, k], 2), torch.cat([pv, v], 2), c.mask(k.device)


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
        self.dual = cache == "dual"
        self.block: tuple[int, int] | None = None
        self.records: list[_Recorded | None] = [None, None]  # per branch (cond, uncond)
        self.last: list[Tensor | None] = [None, None]

    def start_block(self, lo: int, hi: int) -> None:
        self.block = (lo, hi)
        self.records = [None, None]

    def hidden(self, seq: Tensor, branch: int = 0) -> Tensor:
        if self.block is None:
            return super().hidden(seq, branch)
        rec = self.records[branch]
        if rec is None:
            causal = bool(getattr(self.net.attn_layers, "causal", False))
            rec = _Recorded(*self.block, seq.shape[1], self.dual, causal)
            self.records[branch] = rec
        else:
            rec.recording = False
        q0, q1 = rec.query_range()
        prev = self.prev_emb[branch]
        sum_embeds = self_cond_embeds(self.to_self_cond, prev)
        if sum_embeds is not None:
            sum_embeds = sum_embeds[:, q0:q1]
        part = _encode(self.net, seq[:, q0:q1], q0, sum_embeds, rec)  # (B, q1 - q0, dim)
        rec.recording = False
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


def _encode(net: nn.Module, x: Tensor, start: int, sum_embeds: Tensor | None, cache: Any) -> Tensor:
    """The net's embeddings (B, Q, dim) of tokens x (B, Q) at positions start.., through `cache`.

    The embedding steps of `TransformerWrapper.forward` (token, absolute position, sum_embeds,
    norm, projection), then its attention layers; tests compare a full call with `net(x)`.
    """
    m: Any = net
    pos = torch.arange(start, start + x.shape[1], device=x.device)
    h = m.token_emb(x)
    if m.abs_pos_emb is not None:
        h = h + m.abs_pos_emb(pos)
    if sum_embeds is not None:
        h = h + sum_embeds
    for step in (m.post_emb_norm, m.emb_dropout, m.project_emb):
        if step is not None:
            h = step(h)
    return m.attn_layers(h, pos, cache=cache)
