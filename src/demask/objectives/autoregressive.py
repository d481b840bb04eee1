"""The autoregressive objective: teacher-forced next-token cross-entropy, plus the seed's extras.

`autoregressive_loss(net, x)` computes, for tokens x (B, N), the mean cross-entropy of predicting
x[:, 1:] from x[:, :-1] with a causal `net`. Optional terms, each off by default:

- forgetful causal masking (`mask_prob > 0`, training only): a fraction of the *input* tokens is
  hidden from attention through the padding mask, so later tokens cannot lean on them
  (Liu et al. 2022, "Forgetful Causal Masking Makes Causal Language Models Better Zero-Shot
  Learners", https://arxiv.org/abs/2210.13432). Every row hides exactly
  floor(mask_prob * (N - 1)) of its N - 1 input positions, never the first (so every query keeps a
  key to attend to). All targets are still predicted.
- the attention z-loss of the backbone (`add_attn_z_loss`; PaLM, https://arxiv.org/abs/2204.02311),
  taken from `Intermediates.attn_z_loss`, which the backbone already weights.
- a next-embedding loss when the net has a continuous prediction head
  (`add_continuous_pred_head=True`): at position i the head's prediction is compared with the
  *detached* token embedding of token i + 1 by cosine distance, 1 - cos(pred, emb), averaged over
  the positions whose target counts. Cosine distance is scale-free, so `next_embed_loss_weight`
  means the same whatever the scale of the embedding table (at the usual std 0.02 init an MSE
  would be ~1e-3 and vanish next to the cross-entropy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demask._checks import check_float, check_int, check_tokens

__all__ = ["LossOptions", "autoregressive_loss", "forgetful_causal_mask"]


def forgetful_causal_mask(
    batch: int,
    length: int,
    mask_prob: float,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep-mask (B, N) for forgetful causal masking: False = hidden from attention.

    Each row hides exactly floor(mask_prob * N) positions (at most N - 1), chosen uniformly among
    positions 1..N-1; position 0 is always kept (arXiv 2210.13432).
    """
    mask_prob = check_float("mask_prob", mask_prob, min=0.0, max=1.0, max_inclusive=False)
    keep = torch.ones(batch, length, dtype=torch.bool, device=device)
    count = min(int(mask_prob * length), length - 1)
    if count <= 0:
        return keep
    scores = torch.rand(batch, length - 1, device=device, generator=generator)  # (B, N-1)
    hidden = scores.topk(count, dim=-1).indices + 1  # (B, count), never position 0
    return keep.scatter_(1, hidden, False)


def _has_continuous_head(net: nn.Module) -> bool:
    return getattr(net, "continuous_pred_head", None) is not None


@dataclass(frozen=True)
class LossOptions:
    """The objective's settings (the wrapper's constructor arguments of the same names)."""

    ignore_index: int = -100
    pad_value: int = 0
    mask_prob: float = 0.0  # forgetful causal masking; pass it only in training
    add_attn_z_loss: bool = False
    next_embed_loss_weight: float = 0.1


def _check_input(x: Any, mask: Tensor | None, max_seq_len: int) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a (batch, length) tensor of token ids, got {shape}")
    check_int("x.shape[1]", x.shape[1], min=2)
    if x.shape[1] - 1 > max_seq_len:
        raise ValueError(
            f"x has length {x.shape[1]}, so the model input x[:, :-1] has {x.shape[1] - 1} tokens, "
            f"more than max_seq_len={max_seq_len}"
        )
    if mask is not None and (mask.shape != x.shape or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(x.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )


def _next_embed_loss(net: nn.Module, inter: Any, tokens: Tensor, counts: Tensor) -> Tensor:
    """Mean cosine distance between the head's prediction at i and the embedding of token i + 1."""
    pred = inter.continuous_pred if inter is not None else None  # (B, N-1, E)
    if pred is None:
        raise ValueError("the net has a continuous_pred_head but returned no continuous_pred")
    next_tokens = tokens[:, 1:]  # (B, N-1); ignored targets are masked out below
    target_emb = cast(nn.Module, net.token_emb)(next_tokens).detach()  # (B, N-1, E)
    dist = 1 - F.cosine_similarity(pred.float(), target_emb.float(), dim=-1)  # (B, N-1)
    weight = counts.to(dist.dtype)
    return (dist * weight).sum() / weight.sum().clamp(min=1)


def autoregressive_loss(
    net: nn.Module,
    x: Tensor,
    options: LossOptions | None = None,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    **net_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Teacher-forcing loss of a causal `net` on tokens x (B, N): returns (loss, metrics).

    x may hold `ignore_index` where a target must not count (e.g. padding); when `ignore_index` is
    not a valid token id, those input positions are fed as `pad_value`. `mask` (B, N) bool marks
    real tokens (False = padding): padding is hidden from attention and never a target.
    `mask_prob` > 0 applies forgetful causal masking (pass it only in training; the wrapper does).
    Extra keyword arguments go to the net (e.g. `context` for cross-attention).

    metrics holds detached scalars: "ce" (nats per target token), "tokens" (number of targets),
    and "attn_z_loss" / "next_embed_loss" when those terms are on.
    """
    opts = options or LossOptions()
    ignore_index, pad_value = opts.ignore_index, opts.pad_value
    num_tokens = cast(int, net.num_tokens)
    _check_input(x, mask, cast(int, net.max_seq_len))
    x = check_tokens("x", x, num_tokens=num_tokens, ignore_index=ignore_index, nonempty=True)
    ignored = x == ignore_index  # (B, N)
    ignore_is_token = 0 <= ignore_index < num_tokens
    if not ignore_is_token and bool(ignored.any()):  # ignored inputs are fed as pad_value
        check_int("pad_value", pad_value, min=0, max=num_tokens - 1)
    tokens = x if ignore_is_token else x.masked_fill(ignored, pad_value)
    inp, target = tokens[:, :-1], x[:, 1:]  # (B, N-1) each
    if mask is not None:
        target = target.masked_fill(~mask[:, 1:], ignore_index)
    counts = target != ignore_index  # (B, N-1): the positions whose target counts

    attn_mask = None if mask is None else mask[:, :-1]
    if opts.mask_prob > 0:
        keep = forgetful_causal_mask(
            inp.shape[0], inp.shape[1], opts.mask_prob, device=x.device, generator=generator
        )
        attn_mask = keep if attn_mask is None else attn_mask & keep

    want_continuous = _has_continuous_head(net) and opts.next_embed_loss_weight > 0
    want_inter = opts.add_attn_z_loss or want_continuous
    out = net(
        inp,
        mask=attn_mask,
        return_intermediates=want_inter,
        return_attn_z_loss=opts.add_attn_z_loss,
        **net_kwargs,
    )
    logits, inter = out if want_inter else (out, None)  # logits (B, N-1, V)

    logits_t = logits.transpose(1, 2).float()  # (B, V, N-1): cross_entropy wants classes second
    if getattr(net, "output_is_log_prob", False):
        ce = F.nll_loss(logits_t, target, ignore_index=ignore_index)
    else:
        ce = F.cross_entropy(logits_t, target, ignore_index=ignore_index)
    loss = ce
    metrics: dict[str, Tensor] = {"ce": ce.detach(), "tokens": counts.sum()}

    if opts.add_attn_z_loss:
        z = inter.attn_z_loss if inter is not None else None
        if z is None:
            raise ValueError(
                "add_attn_z_loss=True but the net returned no Intermediates.attn_z_loss"
            )
        loss = loss + z
        metrics["attn_z_loss"] = z.detach()

    if want_continuous:
        embed_loss = _next_embed_loss(net, inter, tokens, counts)
        loss = loss + opts.next_embed_loss_weight * embed_loss
        metrics["next_embed_loss"] = embed_loss.detach()

    return loss, metrics
