"""The seed-compatible backbone: `TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(...))`.

The model maps tokens to logits (and embeddings). It knows nothing of masking, schedules or
sampling: those live in `demask.objectives`, `demask.samplers` and `demask.decoding`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from demask._checks import check_float, check_int, check_tokens, reject_unknown_kwargs
from demask.model.init import init_weights
from demask.model.intermediates import Intermediates, resume
from demask.model.kv_cache import KVCache, LayerCache
from demask.model.layers import Block, Linear, Norm, Record, Rotary


class AttentionLayers(nn.Module):
    """A stack of `depth` blocks. Use `Encoder` (bidirectional) or `Decoder` (causal).

    Keyword options (the names follow the seed library's, so configs carry over):
      dim, depth, heads                  model width, number of blocks, attention heads
      attn_dim_head=64                   width of each head
      attn_kv_heads=None                 grouped-query attention: fewer key/value heads (divides heads)
      attn_qk_norm=False                 normalise queries and keys
      attn_dropout=0., ff_dropout=0.     dropout on attention weights / inside the feed-forward
      attn_flash=False                   accepted for compatibility: attention always runs through
                                         scaled_dot_product_attention, which picks flash kernels itself
      ff_glu=False, ff_swish=False       gated feed-forward: GEGLU, or SwiGLU with ff_swish
      ff_mult=4                          feed-forward hidden width = ff_mult * dim
      use_rmsnorm=False                  RMSNorm instead of LayerNorm
      rotary_pos_emb=False               rotary positions (then no absolute position embedding)
      rotary_emb_dim=None                channels rotated per head (default: all of attn_dim_head)
      cross_attend=False                 cross-attention to `context` in every block
      attn_z_loss_weight=1e-4            weight of the attention z-loss when it is asked for
    """

    causal: bool = False

    def __init__(  # noqa: PLR0913  (the seed's keyword options, one parameter each)
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        *,
        attn_dim_head: int = 64,
        attn_kv_heads: int | None = None,
        attn_qk_norm: bool = False,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        attn_flash: bool = False,
        ff_glu: bool = False,
        ff_swish: bool = False,
        ff_mult: float = 4,
        use_rmsnorm: bool = False,
        rotary_pos_emb: bool = False,
        rotary_emb_dim: int | None = None,
        cross_attend: bool = False,
        attn_z_loss_weight: float = 1e-4,
        **kwargs: Any,
    ):
        super().__init__()
        check_int("dim", dim, min=1)
        check_int("depth", depth, min=1)
        check_int("heads", heads, min=1)
        cfg: dict[str, Any] = dict(
            heads=heads,
            attn_dim_head=attn_dim_head,
            attn_kv_heads=attn_kv_heads or heads,
            attn_qk_norm=attn_qk_norm,
            attn_dropout=attn_dropout,
            ff_dropout=ff_dropout,
            ff_glu=ff_glu,
            ff_swish=ff_swish,
            ff_mult=ff_mult,
            use_rmsnorm=use_rmsnorm,
        )
        del attn_flash  # always on: see the docstring
        rotary, rotary_dim, cross = rotary_pos_emb, rotary_emb_dim, cross_attend
        self.attn_z_loss_weight = check_float("attn_z_loss_weight", attn_z_loss_weight, min=0.0)
        reject_unknown_kwargs(type(self).__name__, kwargs)
        check_int("attn_dim_head", cfg["attn_dim_head"], min=1)
        check_int("attn_kv_heads", cfg["attn_kv_heads"], min=1, max=heads)
        if heads % cfg["attn_kv_heads"]:
            raise ValueError(f"attn_kv_heads must divide heads={heads}, got {cfg['attn_kv_heads']}")
        check_float("attn_dropout", cfg["attn_dropout"], min=0.0, max=1.0, max_inclusive=False)
        check_float("ff_dropout", cfg["ff_dropout"], min=0.0, max=1.0, max_inclusive=False)
        check_float("ff_mult", cfg["ff_mult"], min=0.0, min_inclusive=False)

        self.dim, self.depth, self.heads = dim, depth, heads
        self.dim_head, self.kv_heads = cfg["attn_dim_head"], cfg["attn_kv_heads"]
        self.cross_attend = bool(cross)
        self.rotary: Rotary | None = None
        if rotary:
            rot = rotary_dim if rotary_dim is not None else self.dim_head
            check_int("rotary_emb_dim", rot, min=2, max=self.dim_head)
            self.rotary = Rotary(rot)
        self.blocks = nn.ModuleList(
            Block(dim, cfg, causal=self.causal, cross=self.cross_attend) for _ in range(depth)
        )
        self.final_norm = Norm(dim, cfg["use_rmsnorm"])

    @property
    def rotary_pos_emb(self) -> bool:
        return self.rotary is not None

    def forward(
        self,
        x: Tensor,  # (B, N, dim)
        pos: Tensor,  # (N,) or (B, N) positions (relative to each row's start)
        key_mask: Tensor | None = None,  # (B, N) True = real token
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: tuple[KVCache, Tensor, bool] | None = None,  # cache, absolute positions (N,), read?
        inter: Intermediates | None = None,
        z_loss: bool = False,
    ) -> Tensor:
        rot = self.rotary.angles(pos) if self.rotary is not None else None
        record = None
        if inter is not None:
            record = Record(
                [] if z_loss else None, inter.kv if self.causal and cache is None else None
            )
        layer_caches: list[LayerCache | None] = [None] * self.depth
        if cache is not None:  # slots and mask once per pass, shared by the layers
            kv_cache, input_pos, read = cache
            slots, mask = kv_cache.step(input_pos, key_mask, read)
            layer_caches = [kv_cache.layer(i, slots, mask) for i in range(self.depth)]
        for block, layer_cache in zip(self.blocks, layer_caches):
            if inter is not None:
                inter.hiddens.append(x)
            x = block(x, self.rotary, rot, key_mask, context, context_mask, layer_cache, record)
        if inter is not None and record is not None and record.z_loss:
            inter.attn_z_loss = torch.stack(record.z_loss).mean() * self.attn_z_loss_weight
        return self.final_norm(x)


class Encoder(AttentionLayers):
    """Bidirectional attention layers: every position sees every other (masked models)."""

    causal = False


class Decoder(AttentionLayers):
    """Causal attention layers: position i sees positions <= i (autoregressive models)."""

    causal = True


class TransformerWrapper(nn.Module):
    """Token embedding + attention layers + output head: tokens (B, N) -> logits (B, N, V).

    Args:
      num_tokens: vocabulary size (include any special ids such as a mask token).
      max_seq_len: the longest sequence the model is trained on (absolute positions need it).
      attn_layers: an `Encoder` or `Decoder`.
      emb_dim: token embedding width (default: attn_layers.dim; projected when different).
      emb_dropout: dropout on the input embeddings.
      tie_embedding: share the embedding table with the output projection.
      use_abs_pos_emb: learned absolute positions (ignored when the layers use rotary positions).
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
        **kwargs: Any,
    ):
        super().__init__()
        reject_unknown_kwargs("TransformerWrapper", kwargs)
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
        self.abs_pos_emb = (
            nn.Embedding(max_seq_len, emb_dim)
            if use_abs_pos_emb and not attn_layers.rotary_pos_emb
            else None
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
            h = h + self.abs_pos_emb(pos)
        if sum_embeds is not None:
            h = h + sum_embeds
        if self.post_emb_norm is not None:
            h = self.post_emb_norm(h)
        if self.emb_dropout is not None:
            h = self.emb_dropout(h)
        if self.project_emb is not None:
            h = self.project_emb(h)
        return h

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
        read = True  # attend over the cache (not on a fresh cache's first step: write only)
        if cache is not None and host_cache:
            top, read = cache.length + n - 1, cache.length > 0
            input_pos = cache.positions(n)
        elif input_pos is not None:
            top = None
        pos = input_pos if input_pos is not None else torch.arange(n, device=x.device)
        if seq_start_pos is not None:
            pos = (pos[None, :] - seq_start_pos[:, None]).clamp(min=0)  # (B, N)

        h = self._embed(x, pos, top, sum_embeds)
        inter = Intermediates(cache=cache, key_mask=mask) if return_intermediates else None
        emb = self.attn_layers(
            h,
            pos,
            key_mask=mask,
            context=context,
            context_mask=context_mask,
            cache=None if cache is None or input_pos is None else (cache, input_pos, read),
            inter=inter,
            z_loss=return_attn_z_loss and return_intermediates,
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
