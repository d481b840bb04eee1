"""`Intermediates`: what `TransformerWrapper.forward(..., return_intermediates=True)` returns
beside its output, and the seed library's cache idiom built on it:

    logits, cache = net(x, return_intermediates=True)      # a causal net records its keys/values
    logits, cache = net(x_longer, cache=cache, return_intermediates=True)  # only the new tokens run

The first call costs nothing extra (it keeps views of keys and values the pass computed anyway);
the first continuation copies them into a static `KVCache`, which later calls update in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from demask.model.kv_cache import KVCache


@dataclass
class Intermediates:
    """What `forward(..., return_intermediates=True)` returns beside its output."""

    hiddens: list[Tensor] = field(default_factory=list)  # input of each block, (B, N, dim)
    attn_z_loss: Tensor | None = None  # weighted mean logsumexp^2 of attention logits
    cache: KVCache | None = None  # the cache that was updated in place, if any
    continuous_pred: Tensor | None = None  # (B, N, emb_dim) next-embedding prediction
    # each self-attention layer's keys and values (B, kv_heads, N, dim_head), causal nets only
    kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    key_mask: Tensor | None = None  # (B, N) the padding mask of the recorded positions
    cache_length: int = 0  # positions cached (in `cache`, or recorded in `kv`)
    record_z_loss: bool = False  # asked of the pass: fill `attn_z_loss`


def resume(
    inter: Intermediates, x: Tensor, mask: Tensor | None, max_seq_len: int
) -> tuple[Tensor, Tensor | None, KVCache]:
    """`net(x_longer, cache=inter)`: x holds the whole sequence, of which the first
    `inter.cache_length` positions are cached. Returns (the new tokens, their mask, the KVCache),
    building the cache from the recorded keys/values the first time. Calling twice with the same
    `inter` branches from the same state (the cache rewinds) until the cache has wrapped."""
    cached = inter.cache_length
    if inter.cache is None and not inter.kv:
        raise ValueError(
            "cache=Intermediates holds no keys/values: it must come from a causal net "
            "(a Decoder) called with return_intermediates=True"
        )
    if x.ndim != 2 or x.shape[1] <= cached:
        raise ValueError(
            f"with cache=Intermediates, x holds the whole sequence: the {cached} cached "
            f"positions and at least one new one, got shape {tuple(x.shape)}"
        )
    cache = inter.cache
    if cache is None:
        cache = KVCache.from_keys_values(inter.kv, inter.key_mask, max(max_seq_len, x.shape[1]))
    cache.rewind(cached)
    if mask is not None and mask.shape == x.shape:
        mask = mask[:, cached:]
    return x[:, cached:], mask, cache
