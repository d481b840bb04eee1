"""The seed-compatible backbone: `TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(...))`.

The model maps tokens to logits (and embeddings). It knows nothing of masking, schedules or
sampling: those live in `demask.objectives`, `demask.samplers` and `demask.decoding`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from demask._checks import check_float, check_int, check_tokens, reject_unknown_kwargs
from demask.model.attention_layers import AttentionLayers, Decoder, Encoder
from demask.model.init import init_weights
from demask.model.intermediates import Intermediates, resume
from demask.model.kv_cache import KVCache
from demask.model.layers import Linear, Norm
from demask.model.positions import ADDED_SCALE, RelativePositions, UntiedPositions

__all__ = ["AttentionLayers", "Decoder", "Encoder", "TransformerWrapper"]


def _cache_step(
    cache: KVCache, input_pos: Tensor | None, n: int
) -> tuple[tuple[Tensor, bool, int], int | None]:
    """((positions (n,), whether attention reads the cache, the slots it reads), the largest
    position when known without a host sync) of a pass of n new tokens. Without input_pos the
    positions continue from cache.length (the host-side path): a fresh cache is only written,
    and reads stop at the bucket of written slots (`KVCache.read_bound`). With input_pos (a
    decoding loop's step) the reads cover cache.read_slots, all slots unless the loop set it."""
    if input_pos is not None:
        return (input_pos, True, cache.read_slots), None
    top = cache.length + n - 1
    return (cache.positions(n), cache.length > 0, cache.read_bound(top)), top


class TransformerWrapper(nn.Module):
    """Token embedding + attention layers + output head: tokens (B, N) -> logits (B, N, V).

    Args:
      num_tokens: vocabulary size (include any special ids such as a mask token).
      max_seq_len: the longest sequence the model is trained on (absolute positions need it).
      attn_layers: an `Encoder` or `Decoder`.
      emb_dim: token embedding width (default: attn_layers.dim; projected when different).
      emb_dropout: dropout on the input embeddings.
      tie_embedding: share the embedding table with the output projection.
      use_abs_pos_emb: learned absolute positions. With rotary layers they are kept only for the
        attention bias below (False: rotary positions alone).
      abs_pos_attn_bias: False: the positions are added to the token embeddings (the seed
        library's form), and rotary layers have no absolute positions. True: the learned table
        also gives every attention logit a bias shared by the layers (`demask.model.positions`;
        bidirectional layers only; with rotary layers, on top of the rotations, and the input
        then cannot pass max_seq_len). None (default): True for an Encoder, False for a Decoder.
        An Encoder with added positions alone does not learn to use its context at seq 256 in a
        small budget, and the bias improves a rotary Encoder too (benchmarks/RESULTS.md);
        checkpoints from before config format 3 (4 for rotary layers) load with False, as they
        were trained.
      rel_pos_attn_bias: a learned bias of the key's offset from the query on every attention
        logit, per head, shared by the layers (`demask.model.positions.RelativePositions`; offsets
        beyond +-(max_seq_len - 1) share the last entry). Bidirectional layers only; off by
        default. Part of the best masked recipe at the quality benchmark's budget
        (benchmarks/RESULTS.md, "The ablation's three modules in the library").
      logits_dim: output width (default num_tokens; 1 for a token critic).
      add_continuous_pred_head: a linear head predicting the next token's embedding.
      post_emb_norm: normalise the embeddings before the layers.
    """

    def __init__(  # noqa: PLR0913  (the seed's signature)
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: AttentionLayers,
        emb_dim: int | None = None,
        emb_dropout: float = 0.0,
        tie_embedding: bool = False,
        use_abs_pos_emb: bool = True,
        logits_dim: int | None = None,
        add_continuous_pred_head: bool = False,
        post_emb_norm: bool = False,
        abs_pos_attn_bias: bool | None = None,
        rel_pos_attn_bias: bool = False,
        **kwargs: Any,
    ):
        super().__init__()
        reject_unknown_kwargs("TransformerWrapper", kwargs)
        if abs_pos_attn_bias is not None and not isinstance(abs_pos_attn_bias, bool):
            raise TypeError(f"abs_pos_attn_bias must be a bool or None, got {abs_pos_attn_bias!r}")
        if not isinstance(rel_pos_attn_bias, bool):
            raise TypeError(f"rel_pos_attn_bias must be a bool, got {rel_pos_attn_bias!r}")
        check_int("num_tokens", num_tokens, min=1)
        check_int("max_seq_len", max_seq_len, min=1)
        if not isinstance(attn_layers, AttentionLayers):
            raise TypeError(
                f"attn_layers must be an Encoder or Decoder, got {type(attn_layers).__name__}"
            )
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else check_int("emb_dim", emb_dim, min=1)
        check_float("emb_dropout", emb_dropout, min=0.0, max=1.0, max_inclusive=False)
        logits_dim = (
            num_tokens if logits_dim is None else check_int("logits_dim", logits_dim, min=1)
        )
        if tie_embedding and (emb_dim != dim or logits_dim != num_tokens):
            raise ValueError(
                "tie_embedding needs emb_dim == attn_layers.dim and logits_dim == num_tokens, "
                f"got emb_dim={emb_dim}, dim={dim}, logits_dim={logits_dim}, num_tokens={num_tokens}"
            )

        self.num_tokens, self.max_seq_len, self.emb_dim = num_tokens, max_seq_len, emb_dim
        self.logits_dim = logits_dim
        self.attn_layers = attn_layers
        self.output_is_log_prob = False
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        if abs_pos_attn_bias and attn_layers.causal:
            raise ValueError(
                "abs_pos_attn_bias=True needs bidirectional layers (an Encoder); a Decoder adds its "
                "positions to the embeddings (abs_pos_attn_bias=None or False)"
            )
        if abs_pos_attn_bias and not use_abs_pos_emb:
            raise ValueError(
                "abs_pos_attn_bias=True needs the learned position table, but "
                "use_abs_pos_emb=False: pass use_abs_pos_emb=True, or abs_pos_attn_bias=None or "
                "False for a net without absolute positions"
            )
        if rel_pos_attn_bias and attn_layers.causal:
            raise ValueError(
                "rel_pos_attn_bias=True needs bidirectional layers (an Encoder), got a Decoder"
            )
        biased = use_abs_pos_emb and (
            (not attn_layers.causal) if abs_pos_attn_bias is None else abs_pos_attn_bias
        )
        # rotary layers keep a learned table only for the bias (with it, on top of the rotations)
        self.abs_pos_emb = (
            nn.Embedding(max_seq_len, emb_dim)
            if use_abs_pos_emb and (biased or not attn_layers.rotary_pos_emb)
            else None
        )
        self.abs_pos_attn = (
            UntiedPositions(emb_dim, attn_layers.heads, attn_layers.dim_head) if biased else None
        )
        self.rel_pos_attn = (
            RelativePositions(attn_layers.heads, max_seq_len) if rel_pos_attn_bias else None
        )
        self.post_emb_norm = Norm(emb_dim) if post_emb_norm else None
        self.emb_dropout = nn.Dropout(emb_dropout) if emb_dropout > 0 else None
        self.project_emb = Linear(emb_dim, dim) if emb_dim != dim else None
        self.to_logits = Linear(dim, logits_dim, bias=False)
        if tie_embedding:
            self.to_logits.weight = self.token_emb.weight
        self.continuous_pred_head = Linear(dim, emb_dim) if add_continuous_pred_head else None
        init_weights(self)

    @property
    def can_cache_kv(self) -> bool:
        return self.attn_layers.causal

    @property
    def can_cache_kv_outside_max_seq_len(self) -> bool:
        return self.abs_pos_emb is None

    def new_cache(
        self,
        batch_size: int,
        capacity: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bidirectional: bool = False,
    ) -> KVCache:
        """A preallocated key/value cache for `batch_size` rows and `capacity` positions.

        bidirectional=True: a query sees every written slot (block decoding of an Encoder, whose
        recorded keys and values are reused); otherwise the cache is causal and needs a Decoder."""
        if not bidirectional and not self.can_cache_kv:
            raise ValueError("a key/value cache needs causal attention layers (a Decoder)")
        capacity = self.max_seq_len if capacity is None else check_int("capacity", capacity, min=1)
        ref = self.token_emb.weight
        layers = self.attn_layers
        return KVCache(
            layers.depth,
            check_int("batch_size", batch_size, min=1),
            layers.kv_heads,
            layers.dim_head,
            capacity,
            device=device or ref.device,
            dtype=dtype or ref.dtype,
            causal=not bidirectional,
        )

    def _embed(self, x: Tensor, pos: Tensor, top: int | None, sum_embeds: Tensor | None) -> Tensor:
        """Token (+ absolute position) embeddings (B, N, dim); `top`: the largest position, when
        known on the host (checked against max_seq_len)."""
        h = self.token_emb(x)  # (B, N, E)
        if self.abs_pos_emb is not None:
            if top is not None and top >= self.max_seq_len:
                raise ValueError(
                    f"position {top} is past max_seq_len={self.max_seq_len}; absolute position "
                    "embeddings cannot go further (use rotary_pos_emb=True, or a shorter input)"
                )
            p = self.abs_pos_emb(pos)
            # with the attention bias (`_layers`), the unit-scale table is added scaled down
            h = h + (p if self.abs_pos_attn is None else p * ADDED_SCALE)
        if sum_embeds is not None:
            h = h + sum_embeds
        if self.post_emb_norm is not None:
            h = self.post_emb_norm(h)
        if self.emb_dropout is not None:
            h = self.emb_dropout(h)
        if self.project_emb is not None:
            h = self.project_emb(h)
        return h

    def _layers(self, h: Tensor, pos: Tensor, **kwargs: Any) -> Tensor:
        """The attention layers on embeddings h (B, N, dim) at positions pos, with this net's
        positional logit bias when it has one (absolute positions', relative offsets', or both)."""
        has_bias = self.abs_pos_attn is not None or self.rel_pos_attn is not None
        bias = partial(self._pos_bias, pos) if has_bias else None
        return self.attn_layers(h, pos, pos_bias=bias, **kwargs)

    def _pos_bias(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """(…, H, Nq, Nk): the absolute positions' untied term plus the relative offsets' bias."""
        bias = None
        if self.abs_pos_attn is not None:
            assert self.abs_pos_emb is not None
            p_query = self.abs_pos_emb(query_pos)
            p_key = p_query if key_pos is query_pos else self.abs_pos_emb(key_pos)  # no cache
            bias = self.abs_pos_attn(p_query, p_key)
        if self.rel_pos_attn is not None:
            rel = self.rel_pos_attn(query_pos, key_pos)
            bias = rel if bias is None else bias + rel
        assert bias is not None
        return bias

    def _check_call(
        self, x: Tensor, mask: Tensor | None, cache: KVCache | None, context: Tensor | None
    ) -> None:
        if mask is not None and (mask.shape != x.shape or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(x.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if cache is not None:
            if not self.can_cache_kv:
                raise ValueError("cache needs causal attention layers (a Decoder)")
            if cache.batch_size != x.shape[0]:
                raise ValueError(f"cache holds {cache.batch_size} rows, x has {x.shape[0]}")
        if self.attn_layers.cross_attend and context is None:
            raise ValueError("these layers were built with cross_attend=True: pass context")

    def forward(  # noqa: PLR0913  (seed signature, plus input_pos)
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_embeddings: bool = False,
        return_logits_and_embeddings: bool = False,
        return_intermediates: bool = False,
        return_attn_z_loss: bool = False,
        sum_embeds: Tensor | None = None,
        cache: KVCache | Intermediates | None = None,
        seq_start_pos: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """x: (B, N) token ids -> logits (B, N, V) (or what the return_* flags ask for).

        With a KVCache, x holds only the new tokens: their positions continue from cache.length
        (which then grows by N), or are `input_pos` (N,) (the compiled decoding step: static
        shapes, no host-side state; the caller then keeps the count, and x is trusted to hold
        valid ids). With cache=Intermediates (the seed's idiom), x holds the whole sequence and the
        logits of its new positions are returned.
        """
        reject_unknown_kwargs("TransformerWrapper.forward", kwargs)
        if input_pos is not None and not isinstance(cache, KVCache):
            raise ValueError("input_pos needs cache=KVCache (it gives the new tokens' slots)")
        if isinstance(cache, Intermediates):
            x, mask, cache = resume(cache, x, mask, self.max_seq_len)
        if input_pos is None:  # the decoding loop's own steps (input_pos) feed back valid ids
            x = check_tokens("x", x, num_tokens=self.num_tokens)  # any integer dtype -> long
        self._check_call(x, mask, cache, context)
        n = x.shape[1]
        host_cache = cache is not None and input_pos is None  # positions from cache.length
        top: int | None = n - 1  # the largest position, when known without a host sync
        step = None  # (the new positions, read the cache?, slots read) of a cached pass
        if cache is not None:
            step, top = _cache_step(cache, input_pos, n)
            input_pos = step[0]
        pos = input_pos if input_pos is not None else torch.arange(n, device=x.device)
        if seq_start_pos is not None:
            pos = (pos[None, :] - seq_start_pos[:, None]).clamp(min=0)  # (B, N)

        h = self._embed(x, pos, top, sum_embeds)
        inter = None
        if return_intermediates:
            inter = Intermediates(cache=cache, key_mask=mask, record_z_loss=return_attn_z_loss)
        emb = self._layers(
            h,
            pos,
            key_mask=mask,
            context=context,
            context_mask=context_mask,
            cache=None if step is None else (cache, *step),
            inter=inter,
        )  # (B, N, dim)
        if cache is not None and host_cache:
            cache.length += n
        if inter is not None:
            inter.cache_length = cache.length if cache is not None else n
            if self.continuous_pred_head is not None:
                inter.continuous_pred = self.continuous_pred_head(emb)

        if return_embeddings:
            out: Any = emb
        else:
            logits = self.to_logits(emb)  # (B, N, logits_dim)
            out = (logits, emb) if return_logits_and_embeddings else logits
        return (out, inter) if return_intermediates else out

    def logits_from_embeddings(self, emb: Tensor) -> Tensor:
        """Apply the output head to (..., dim) embeddings (e.g. only at still-masked positions)."""
        return self.to_logits(emb)
