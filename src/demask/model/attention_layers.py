"""The attention stack: `Encoder` (bidirectional) and `Decoder` (causal), the seed's `attn_layers`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from demask._checks import check_float, check_int, reject_unknown_kwargs
from demask.model.intermediates import Intermediates
from demask.model.kv_cache import KVCache, LayerCache
from demask.model.layers import Block, Norm, Positions, Record, Rotary

INPUT_SKIP_SCALE = 8.0  # `input_skip`'s mu_l = INPUT_SKIP_SCALE * its stored value


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
      zero_init_branch_output=False      the projections that write into the residual stream start
                                         at zero: every block starts as the identity
      input_skip=False                   block l reads x + mu_l x0, x0 the layers' input, mu_l
                                         learned per block and started at 0 (the skip from the
                                         embeddings of modded-nanogpt; demask's own option)
      shift_tokens=0                     (Encoder) k > 0: every block's normed attention and
                                         feed-forward inputs read their channels in 2k + 1
                                         parts from positions i - k .. i + k (a token shift,
                                         the seed library's option of the same name, as an int)
    The last three are part of the best masked recipe at the quality benchmark's budget
    (benchmarks/RESULTS.md, "The ablation's three modules in the library" and "The token shift
    in both libraries").
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
        zero_init_branch_output: bool = False,
        input_skip: bool = False,
        shift_tokens: int = 0,
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
        for name, value in (("zero_init_branch_output", zero_init_branch_output),
                            ("input_skip", input_skip)):  # fmt: skip
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        check_int("shift_tokens", shift_tokens, min=0, max=(dim - 1) // 2)
        if shift_tokens and self.causal:
            raise ValueError(
                f"shift_tokens is an Encoder option, got shift_tokens={shift_tokens} for a "
                "Decoder (its cached decoding does not keep the earlier positions' inputs)"
            )
        cfg["shift_tokens"] = shift_tokens
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
        self.zero_init_branch_output = zero_init_branch_output  # read by demask.model.init
        # mu_l stored at 1 / INPUT_SKIP_SCALE of its use, so AdamW moves it that much faster
        self.input_skip = nn.Parameter(torch.zeros(depth)) if input_skip else None
        self.shift_tokens = shift_tokens

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
        # cache, absolute positions (N,), read?, slots read
        cache: tuple[KVCache, Tensor, bool, int] | None = None,
        inter: Intermediates | None = None,
        pos_bias: Callable[[Tensor], Tensor] | None = None,  # key positions -> logit bias
    ) -> Tensor:
        rot = self.rotary.angles(pos) if self.rotary is not None else None
        record = None
        if inter is not None:
            record = Record(
                [] if inter.record_z_loss else None,
                inter.kv if self.causal and cache is None else None,
            )
        layer_caches: list[LayerCache | None] = [None] * self.depth
        key_pos = pos  # the positions of the keys attention reads
        if cache is not None and self.shift_tokens:
            raise ValueError(
                f"a net with shift_tokens={self.shift_tokens} cannot run on a key/value cache: "
                "a cached pass computes only some positions, and each reads its neighbours"
            )
        if cache is not None:  # slots and mask once per pass, shared by the layers
            kv_cache, input_pos, read, read_slots = cache
            slots, mask = kv_cache.step(input_pos, key_mask, read, read_slots)
            layer_caches = [kv_cache.layer(i, slots, mask) for i in range(self.depth)]
            if mask is not None:  # the slots read (-1: never written, masked out)
                key_pos = kv_cache.slot_pos[:read_slots].clamp(min=0)
        bias = pos_bias(key_pos) if pos_bias is not None else None
        positions = Positions(self.rotary, rot, bias)
        x0 = x
        for i, (block, layer_cache) in enumerate(zip(self.blocks, layer_caches)):
            if self.input_skip is not None:
                x = x + (self.input_skip[i] * INPUT_SKIP_SCALE).to(x.dtype) * x0
            if inter is not None:
                inter.hiddens.append(x)
            x = block(x, positions, key_mask, context, context_mask, layer_cache, record)
        if inter is not None and record is not None and record.z_loss:
            inter.attn_z_loss = torch.stack(record.z_loss).mean() * self.attn_z_loss_weight
        return self.final_norm(x)


class Encoder(AttentionLayers):
    """Bidirectional attention layers: every position sees every other (masked models)."""

    causal = False


class Decoder(AttentionLayers):
    """Causal attention layers: position i sees positions <= i (autoregressive models)."""

    causal = True
