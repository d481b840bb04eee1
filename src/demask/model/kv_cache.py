"""A static, preallocated key/value cache for causal decoding.

Buffers are allocated once (`capacity` slots per layer) and written in place, so a decoding step
allocates nothing and the shapes stay fixed for `torch.compile` (the design of gpt-fast's KVCache).
Past `capacity` the cache becomes a ring: slot = position % capacity, and each query attends to
the last `capacity` positions (a sliding window). That is only meaningful with relative (rotary)
positions; the model refuses it with absolute position embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value buffers of shape (B, kv_heads, capacity, dim_head) plus shared state.

    `length` is the number of positions written so far (it may exceed `capacity` in ring mode);
    `key_valid` (B, capacity) marks padding slots (False) of left-padded prompts.
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
    ):
        shape = (batch_size, kv_heads, capacity, dim_head)
        # empty, not zeros: a slot is read only after it was written
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.key_valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)
        self._arange = torch.arange(capacity, device=device)  # positions, sliced without allocating
        self.capacity = capacity
        self.batch_size = batch_size
        self.length = 0
        self.has_padding = False
        # state of the step in progress, shared by all layers (set by `begin`)
        self._slots: slice | Tensor = slice(0, 0)
        self._visible = 0
        self._mask: Tensor | None = None

    def reset(self) -> None:
        self.length = 0
        self.has_padding = False
        self.key_valid.fill_(True)

    def begin(self, n: int, key_valid: Tensor | None) -> None:
        """Prepare a step that appends `n` positions; key_valid (B, n) marks padding among them."""
        start, end = self.length, self.length + n
        if end <= self.capacity:
            self._slots = slice(start, end)
            self._visible = end
            if key_valid is not None:
                self.key_valid[:, start:end] = key_valid
                self.has_padding = self.has_padding or not bool(key_valid.all())
            mask = None
            if n > 1:  # causal among the new positions
                q_pos = self._arange[start:end]
                mask = self._arange[None, :end] <= q_pos[:, None]  # (n, end)
                mask = mask[None, None]
            if self.has_padding:
                kv = self.key_valid[:, None, None, :end]  # (B, 1, 1, end)
                mask = kv if mask is None else mask & kv
            self._mask = mask
            return
        # ring mode: one position at a time
        if n != 1:
            raise ValueError(
                f"a step that wraps the cache past its capacity {self.capacity} must append one "
                f"position, got {n}; allocate a larger cache with net.new_cache(capacity=...)"
            )
        slot = start % self.capacity
        self._slots = slice(slot, slot + 1)
        self._visible = self.capacity
        # the slot now holds a new position: its old padding flag must not outlive it
        self.key_valid[:, slot] = True if key_valid is None else key_valid[:, 0]
        self._mask = self.key_valid[:, None, None, :] if self.has_padding else None

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)  # made per call: a list of them here would be a ref cycle

    def commit(self, n: int) -> None:
        self.length += n

    def positions(self, n: int) -> Tensor:
        """Absolute positions (n,) of the next `n` positions to be appended."""
        start, end = self.length, self.length + n
        if end <= self.capacity:
            return self._arange[start:end]
        return torch.arange(start, end, device=self.key_valid.device)

    def reorder(self, index: Tensor) -> None:
        """Select/permute batch rows in place (beam search): row b becomes old row index[b]."""
        for buf in (*self.k, *self.v):
            buf.copy_(buf.index_select(0, index))
        self.key_valid.copy_(self.key_valid.index_select(0, index))


class LayerCache:
    """One layer's view of a KVCache: writes the step's keys/values and returns what to attend."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        c = self.cache
        kb, vb = c.k[self.i], c.v[self.i]
        kb[:, :, c._slots] = k
        vb[:, :, c._slots] = v
        return kb[:, :, : c._visible], vb[:, :, : c._visible], c._mask
