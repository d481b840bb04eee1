"""Transformer building blocks: norms, rotary embeddings, attention and the feed-forward block.

Attention always runs through `torch.nn.functional.scaled_dot_product_attention` (flash / memory-
efficient kernels where the device has them), except when the attention z-loss is asked for, which
needs the attention logits themselves (PaLM, arXiv 2204.02311, section 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demask._checks import check_int
from demask.model.kv_cache import LayerCache

Linear = nn.Linear  # every weight matmul; backend tricks (compile, prepacking) come from outside


@dataclass
class Record:
    """What a forward pass collects beside its output, for `Intermediates`."""

    z_loss: list[Tensor] | None = None  # when a list: each layer's attention z-loss
    kv: list[tuple[Tensor, Tensor]] | None = None  # when a list: each layer's (detached) k, v


class Norm(nn.Module):
    """LayerNorm (default) or RMSNorm (`use_rmsnorm`), with a learned gain and no bias."""

    def __init__(self, dim: int, rms: bool = False, eps: float = 1e-5):
        super().__init__()
        self.rms = rms
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864) on the first `rot_dim` channels.

    Positions are given explicitly, so cached decoding, left padding and positions past
    `max_seq_len` all use the same code path.
    """

    inv_freq: Tensor

    def __init__(self, rot_dim: int, base: float = 10000.0):
        super().__init__()
        if rot_dim % 2:
            raise ValueError(f"rotary dimension must be even, got {rot_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rot_dim = rot_dim

    def angles(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """pos: (N,) or (B, N) int positions -> cos, sin of shape (N, R/2) or (B, 1, N, R/2)."""
        freqs = pos.to(self.inv_freq.dtype).unsqueeze(-1) * self.inv_freq  # (..., N, R/2)
        if freqs.ndim == 3:  # per-row positions: broadcast over heads
            freqs = freqs.unsqueeze(1)
        return freqs.cos(), freqs.sin()

    def rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x: (B, H, N, D); rotates channel pairs (i, i + R/2) of the first R channels."""
        r = self.rot_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        x1, x2 = x_rot.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


@dataclass(frozen=True)
class Positions:
    """How one pass tells attention where its tokens are: rotary angles (`rotary`, with `rot` the
    cos, sin of the query positions), and/or `bias` (H, Nq, Nk) or (B, H, Nq, Nk) added to every
    self-attention logit (`demask.model.positions.UntiedPositions`)."""

    rotary: Rotary | None = None
    rot: tuple[Tensor, Tensor] | None = None
    bias: Tensor | None = None


NO_POSITIONS = Positions()


@dataclass(frozen=True)
class AttnOptions:
    """An attention layer's shape and options (see `AttentionLayers` for their meaning)."""

    heads: int
    dim_head: int
    kv_heads: int
    dropout: float = 0.0
    qk_norm: bool = False
    rms: bool = False  # RMSNorm (else LayerNorm) for the QK-norm


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads (`kv_heads` < `heads`), optional QK-norm.

    Self-attention uses one fused q/k/v projection; cross-attention projects the context for k/v.
    """

    def __init__(self, dim: int, opts: AttnOptions, causal: bool, cross: bool = False):
        super().__init__()
        heads, kv_heads, dim_head = opts.heads, opts.kv_heads, opts.dim_head
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.causal, self.cross, self.dropout = causal, cross, opts.dropout
        q_dim, kv_dim = heads * dim_head, kv_heads * dim_head
        if cross:
            self.to_q = Linear(dim, q_dim, bias=False)
            self.to_kv = Linear(dim, 2 * kv_dim, bias=False)
        else:
            self.to_qkv = Linear(dim, q_dim + 2 * kv_dim, bias=False)
        self.to_out = Linear(q_dim, dim, bias=False)
        # QK-norm (arXiv 2302.05442): normalised queries and keys keep attention logits bounded;
        # a learned scalar gain on q lets the model sharpen attention again.
        self.qk_norm = opts.qk_norm
        if opts.qk_norm:
            self.q_norm = Norm(dim_head, rms=opts.rms)
            self.k_norm = Norm(dim_head, rms=opts.rms)
            self.qk_gain = nn.Parameter(torch.ones(()))

    def _split(self, t: Tensor, h: int) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, h, self.dim_head).transpose(1, 2)  # (B, h, N, D)

    def forward(
        self,
        x: Tensor,  # (B, N, dim)
        positions: Positions,  # of x (cross-attention ignores them)
        key_mask: Tensor | None,  # (B, K) bool, True = attend; None = all keys valid
        context: Tensor | None = None,  # (B, M, dim) for cross-attention
        cache: LayerCache | None = None,
        record: Record | None = None,
    ) -> Tensor:
        b, n, _ = x.shape
        q_dim, kv_dim = self.heads * self.dim_head, self.kv_heads * self.dim_head
        if self.cross:
            assert context is not None
            q = self._split(self.to_q(x), self.heads)
            k, v = self.to_kv(context).split((kv_dim, kv_dim), dim=-1)
            k, v = self._split(k, self.kv_heads), self._split(v, self.kv_heads)
        else:  # one view and one transpose for q, k and v together
            qkv = self.to_qkv(x).view(b, n, self.heads + 2 * self.kv_heads, self.dim_head)
            q, k, v = qkv.transpose(1, 2).split((self.heads, self.kv_heads, self.kv_heads), dim=1)
        if self.qk_norm:
            q, k = self.q_norm(q) * self.qk_gain, self.k_norm(k)
        rotary, rot = positions.rotary, positions.rot
        if rotary is not None and rot is not None and not self.cross:
            q, k = rotary.rotate(q, *rot), rotary.rotate(k, *rot)

        if record is not None and record.kv is not None:  # (B, kv_heads, N, D) each
            record.kv.append((k.detach(), v.detach()))
        attn_mask: Tensor | None = None
        is_causal = False
        if cache is not None:  # write the new keys/values at their slots (in place)
            cache.k.index_copy_(2, cache.slots, k.to(cache.k.dtype))
            cache.v.index_copy_(2, cache.slots, v.to(cache.v.dtype))
        if cache is not None and cache.mask is not None:  # attend over the whole buffer, masked
            k, v, attn_mask = cache.k.to(q.dtype), cache.v.to(q.dtype), cache.mask
        else:  # no cache, or the first step of a fresh one: the new keys are all there is
            if key_mask is not None:
                attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, K)
            if self.causal:
                if attn_mask is None:
                    is_causal = True
                else:
                    tri = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                    attn_mask = attn_mask & tri
        if positions.bias is not None and not self.cross:
            attn_mask = _with_bias(positions.bias.to(q.dtype), attn_mask, is_causal, n)
            is_causal = False
        if record is not None and record.z_loss is not None:
            out = self._attend_with_z_loss(q, k, v, attn_mask, is_causal, record.z_loss)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
                enable_gqa=self.kv_heads != self.heads,
            )
        out = out.transpose(1, 2).reshape(b, n, q_dim)  # (B, N, H*D)
        return self.to_out(out)

    def _attend_with_z_loss(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        z_loss: list[Tensor],
    ) -> Tensor:
        """Explicit attention that also records mean(logsumexp(logits)^2) over valid queries."""
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(self.dim_head)  # (B, H, N, K)
        n, kn = logits.shape[-2:]
        if is_causal:
            attn_mask = torch.ones(n, kn, dtype=torch.bool, device=q.device).tril(kn - n)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:  # a logit bias, -inf where masked
            logits = logits + attn_mask
        lse = torch.logsumexp(logits, dim=-1)  # (B, H, N)
        finite = torch.isfinite(lse)
        z_loss.append((lse.where(finite, 0.0) ** 2).sum() / finite.sum().clamp(min=1))
        probs = (logits - lse.where(finite, 0.0).unsqueeze(-1)).exp()
        probs = F.dropout(probs, self.dropout, self.training)
        return probs @ v


def _with_bias(bias: Tensor, attn_mask: Tensor | None, is_causal: bool, n: int) -> Tensor:
    """The float attention mask (4-D): `bias` where a key is visible, -inf elsewhere."""
    if bias.dim() == 3:  # (H, Nq, Nk): a 3-D mask sends CPU SDPA down a path 3x slower
        bias = bias.unsqueeze(0)
    if is_causal:
        attn_mask = torch.ones(n, bias.shape[-1], dtype=torch.bool, device=bias.device).tril()
    if attn_mask is None:
        return bias
    return torch.where(attn_mask, bias, float("-inf"))  # broadcast: (B | 1, H | 1, Nq, Nk)


class FeedForward(nn.Module):
    """MLP with GELU, or a gated unit (GLU, arXiv 2002.05202): GEGLU, or SwiGLU with `swish`."""

    def __init__(self, dim: int, mult: float, glu: bool, swish: bool, dropout: float):
        super().__init__()
        inner = int(dim * mult)
        check_int(f"the feed-forward width int(ff_mult * dim) = int({mult} * {dim})", inner, min=1)
        self.glu = glu
        self.act = F.silu if swish else F.gelu
        self.proj_in = Linear(dim, inner * (2 if glu else 1))
        self.proj_out = Linear(inner, dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.glu:
            h, gate = self.proj_in(x).chunk(2, dim=-1)
            h = h * self.act(gate)
        else:
            h = self.act(self.proj_in(x))
        if self.dropout is not None:
            h = self.dropout(h)
        return self.proj_out(h)


def shift_tokens(h: Tensor, reach: int, key_mask: Tensor | None = None) -> Tensor:
    """`h` (B, N, D) with its channels split in 2 * reach + 1 parts (`tensor_split`), part j read
    from position i + j - reach: the first part from the left, the middle one in place, the last
    from the right; zeros past the ends, and from padding where `key_mask` (B, N) is False."""
    if key_mask is not None:
        h = h.masked_fill(~key_mask[..., None], 0.0)
    parts = []
    for j, part in enumerate(h.tensor_split(2 * reach + 1, dim=-1)):
        offset = j - reach  # position i reads i + offset
        if offset < 0:
            part = F.pad(part, (0, 0, -offset, 0))[:, : h.shape[1]]
        elif offset > 0:
            part = F.pad(part, (0, 0, 0, offset))[:, offset:]
        parts.append(part)
    return torch.cat(parts, dim=-1)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, feed-forward. With
    `cfg["shift_tokens"]` = k > 0 the normed inputs of attention and feed-forward are first
    passed through `shift_tokens` (reach k)."""

    def __init__(self, dim: int, cfg: dict[str, Any], causal: bool, cross: bool):
        super().__init__()
        rms = cfg["use_rmsnorm"]
        self.shift = cfg["shift_tokens"]
        opts = AttnOptions(
            heads=cfg["heads"],
            dim_head=cfg["attn_dim_head"],
            kv_heads=cfg["attn_kv_heads"],
            dropout=cfg["attn_dropout"],
            qk_norm=cfg["attn_qk_norm"],
            rms=rms,
        )
        self.attn_norm = Norm(dim, rms)
        self.attn = Attention(dim, opts, causal=causal)
        self.cross_norm = Norm(dim, rms) if cross else None
        self.cross_attn = Attention(dim, opts, causal=False, cross=True) if cross else None
        self.ff_norm = Norm(dim, rms)
        self.ff = FeedForward(
            dim, cfg["ff_mult"], cfg["ff_glu"], cfg["ff_swish"], cfg["ff_dropout"]
        )

    def forward(
        self,
        x: Tensor,  # (B, N, dim)
        positions: Positions,
        key_mask: Tensor | None,
        context: Tensor | None,
        context_mask: Tensor | None,
        cache: LayerCache | None,
        record: Record | None,
    ) -> Tensor:
        h = self.attn_norm(x)
        if self.shift:
            h = shift_tokens(h, self.shift, key_mask)
        x = x + self.attn(h, positions, key_mask, cache=cache, record=record)
        if self.cross_attn is not None and self.cross_norm is not None:
            x = x + self.cross_attn(self.cross_norm(x), NO_POSITIONS, context_mask, context=context)
        h = self.ff_norm(x)
        if self.shift:
            h = shift_tokens(h, self.shift, key_mask)
        return x + self.ff(h)
