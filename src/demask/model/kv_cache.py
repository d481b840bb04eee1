"""A static, preallocated key/value cache for causal decoding (the design of gpt-fast's KVCache).

Buffers of `capacity` slots per layer are allocated once and written in place at the slots of
explicit positions (`input_pos`), and attention always reads the whole buffer under a mask: a
decoding step has the same shapes at every position, so it can be compiled with `torch.compile`
and captured in a CUDA graph (`demask.decoding.compile_decode`). Position p lives in slot
p % capacity: past `capacity` the cache is a ring, and each query sees the last `capacity`
positions (a sliding window), which is only meaningful with relative (rotary) positions; the
model refuses it with absolute position embeddings.

Which slots a query sees is data, not shape: `slot_pos` (C,) holds the position each slot holds
(-1 = never written), `key_valid` (B, C) marks padding slots of left-padded prompts, and a query at
position p sees slot s when 0 <= slot_pos[s] <= p and key_valid[b, s].

Reading all C slots at every step costs memory traffic for slots not yet written. So until the
ring wraps, the host-side path and the decoding loop's eager steps read only the first
`read_slots` slots: the smallest power of two >= 64 that holds every written position
(`read_bound`), at most C. The compiled decode step reads all C (one shape, one compile).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class LayerCache(NamedTuple):
    """One layer's part of a step: its buffers, where the step writes, and what it may read."""

    k: Tensor  # (B, kv_heads, C, dim_head)
    v: Tensor  # (B, kv_heads, C, dim_head)
    slots: Tensor  # (n,) slots of the step's new positions
    mask: Tensor | None  # (B, 1, n, C) bool, True = attend; None = attend to the new keys only


class KVCache(nn.Module):
    """Per-layer key/value buffers of shape (B, kv_heads, capacity, dim_head) plus slot state.

    An `nn.Module` (with no parameters) so that `torch.compile` treats its tensors as static
    addresses, which CUDA graphs need. `length` counts the positions written through the host-side
    path (`net(x, cache=cache)` without `input_pos`); a caller passing `input_pos` keeps its own
    count. Buffers start at zero, not empty: a masked slot must still hold finite numbers, since
    attention multiplies its (zero) weight with it.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        dim_head: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        causal: bool = True,
    ):
        super().__init__()
        self.causal = causal  # False: a query sees every written slot (a bidirectional net's cache)
        shape = (batch_size, kv_heads, capacity, dim_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.slot_pos = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self._arange = torch.arange(capacity, device=device)  # positions, sliced without allocating
        self.capacity = capacity
        self.batch_size = batch_size
        self.length = 0
        # slots a step with explicit `input_pos` reads (see `read_bound`); the host-side path
        # computes its own from `length`. A decoding loop that knows its position sets it.
        self.read_slots = capacity

    def read_bound(self, top: int) -> int:
        """Slots to read when the largest position held is `top`: the smallest power of two
        >= max(64, top + 1), at most the capacity; the capacity once the ring has wrapped."""
        if top + 1 >= self.capacity:
            return self.capacity
        return min(self.capacity, max(64, 1 << top.bit_length()))

    @classmethod
    def from_keys_values(
        cls, kv: list[tuple[Tensor, Tensor]], key_valid: Tensor | None, capacity: int
    ) -> KVCache:
        """A cache holding positions 0..L-1 from each layer's keys and values (B, kv_heads, L, D),
        as `forward(..., return_intermediates=True)` records them; key_valid (B, L) or None."""
        k0 = kv[0][0]
        batch, heads, length, dim_head = k0.shape
        if length > capacity:
            raise ValueError(f"{length} cached positions do not fit capacity {capacity}")
        cache = cls(len(kv), batch, heads, dim_head, capacity, device=k0.device, dtype=k0.dtype)
        for i, (k, v) in enumerate(kv):
            cache.k[i][:, :, :length] = k
            cache.v[i][:, :, :length] = v
        cache.slot_pos[:length] = cache._arange[:length]
        if key_valid is not None:
            cache.key_valid[:, :length] = key_valid
        cache.length = length
        return cache

    def reset(self) -> None:
        self.length = 0
        self.slot_pos.fill_(-1)
        self.key_valid.fill_(True)

    def rewind(self, length: int) -> None:
        """Continue from `length` positions (forget later ones): branch from an earlier state.

        Possible only while nothing was overwritten, i.e. before the ring wrapped."""
        if length != self.length and self.length > self.capacity:
            raise ValueError(
                f"cannot rewind the cache from {self.length} to {length} positions: it has "
                f"wrapped past its capacity {self.capacity} and overwritten older positions"
            )
        self.length = length

    def positions(self, n: int) -> Tensor:
        """Absolute positions (n,) of the next `n` positions to be appended (host-side path)."""
        start, end = self.length, self.length + n
        if n > 1 and end > self.capacity and start > 0:
            raise ValueError(
                f"a step that wraps the cache past its capacity {self.capacity} must append one "
                f"position, got {n}; allocate a larger cache with net.new_cache(capacity=...)"
            )
        if n > self.capacity:
            raise ValueError(
                f"{n} positions do not fit a cache of capacity {self.capacity}; allocate a larger "
                "cache with net.new_cache(capacity=...)"
            )
        if end <= self.capacity:
            return self._arange[start:end]
        return torch.arange(start, end, device=self.key_valid.device)

    def step(
        self,
        input_pos: Tensor,
        key_valid: Tensor | None,
        read: bool = True,
        read_slots: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Record a step's new positions input_pos (n,) (key_valid (B, n) marks padding among
        them); return their slots (n,) and, when `read`, the attention mask (B, 1, n, R) over
        the first R = read_slots slots (default: all; every slot written so far and by this step
        must lie below it).

        The n positions must not share a slot (n <= capacity, no wrap inside the step)."""
        slots = input_pos % self.capacity  # (n,)
        self.slot_pos.index_copy_(0, slots, input_pos)
        if key_valid is None:  # a new position in a slot drops the old one's padding flag
            self.key_valid.index_fill_(1, slots, True)
        else:
            self.key_valid.index_copy_(1, slots, key_valid)
        if not read:
            return slots, None
        sp = self.slot_pos[:read_slots]
        visible = sp >= 0  # (C,) the written slots
        if self.causal:  # (n, C): causal over the held positions
            visible = visible & (sp <= input_pos[:, None])
        else:
            visible = visible.expand(input_pos.shape[0], -1)
        return slots, visible[None, None] & self.key_valid[:, None, None, :read_slots]

    def layer(self, i: int, slots: Tensor, mask: Tensor | None) -> LayerCache:
        """Layer i's buffers, cut to the R slots that the step's mask (B, 1, n, R) reads."""
        if mask is None:
            return LayerCache(self.k[i], self.v[i], slots, mask)
        r = mask.shape[-1]
        return LayerCache(self.k[i][:, :, :r], self.v[i][:, :, :r], slots, mask)

    def reorder(self, index: Tensor) -> None:
        """Select/permute batch rows in place (beam search): row b becomes old row index[b]."""
        for buf in (*self.k, *self.v):
            buf.copy_(buf.index_select(0, index))
        self.key_valid.copy_(self.key_valid.index_select(0, index))
