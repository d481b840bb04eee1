"""Beam search for autoregressive models, with EOS.

Each of the B rows keeps K hypotheses ranked by their total log-probability. A step scores every
extension of every live hypothesis (K * V candidates per row) and keeps the best K. A hypothesis
that has emitted `eos_token` is finished: it stays a candidate with its score frozen (extended by
`pad_value` at log-probability 0), so finished and live hypotheses compete on equal terms, and the
search ends when all K hypotheses of every row are finished or S tokens were generated. With
beams >= V ** (S - 1) this is an exhaustive search (tested against brute-force enumeration).

`length_penalty` alpha ranks the final hypotheses by score / length ** alpha, length = tokens
generated up to and including EOS (alpha = 0: raw log-probability, the default). During the search
hypotheses are ranked by raw score.

The model is called only through `ModelStepper` (decoding.autoregressive); the key/value cache
follows the surviving hypotheses with `cache.reorder`.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn

from demask.decoding.autoregressive import ModelStepper

__all__ = ["beam_search"]


def beam_search(
    net: nn.Module,
    prompts: Tensor,
    seq_len: int,
    *,
    beams: int,
    start_pos: Tensor | None = None,
    eos_token: int | None = None,
    pad_value: int = 0,
    cache_kv: bool = True,
    length_penalty: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Beam search from left-aligned prompts (B, P); arguments are assumed validated.

    Returns (sequences (B, K, P + S), scores (B, K)), the K hypotheses of each row best first;
    scores are total log-probabilities (nats), divided by length ** length_penalty when it is set.
    """
    batch, prompt_len = prompts.shape
    k = beams
    total = prompt_len + seq_len
    device = prompts.device
    buf = torch.full((batch * k, total), pad_value, dtype=torch.long, device=device)
    buf[:, :prompt_len] = prompts.repeat_interleave(k, dim=0)  # rows b*K .. b*K + K-1
    starts = start_pos.repeat_interleave(k, dim=0) if start_pos is not None else None
    vocab = cast(int, net.num_tokens)
    with ModelStepper(net, buf, prompt_len, starts, cache_kv) as stepper:
        scores = torch.zeros(batch, k, device=device)
        scores[:, 1:] = -math.inf  # the K copies of the prompt: expand only the first at step 1
        finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, k, dtype=torch.long, device=device)
        row_base = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1)

        logits = stepper.prefill()  # (B*K, V)
        for i in range(seq_len):
            cur = prompt_len + i
            logp = logits.float().log_softmax(dim=-1).view(batch, k, vocab)  # (B, K, V)
            cand = scores[:, :, None] + logp  # (B, K, V)
            if eos_token is not None:
                frozen = torch.full_like(cand, -math.inf)
                frozen[:, :, pad_value] = scores
                cand = torch.where(finished[:, :, None], frozen, cand)
            scores, flat_idx = cand.view(batch, k * vocab).topk(k, dim=-1)  # (B, K)
            parent, tokens = flat_idx // vocab, flat_idx % vocab  # (B, K)
            rows = (parent + row_base).view(-1)  # (B*K,) old row of each new hypothesis
            buf.copy_(buf.index_select(0, rows))
            stepper.reorder(rows)
            buf[:, cur] = tokens.view(-1)
            was_finished = finished.gather(1, parent)
            lengths = lengths.gather(1, parent) + (~was_finished).long()
            finished = was_finished
            if eos_token is not None:
                finished = was_finished | (tokens == eos_token)
                if bool(finished.all()):
                    break
            if i + 1 < seq_len:
                logits = stepper.step(cur + 1)

    if length_penalty:
        scores = scores / lengths.clamp(min=1).double().pow(length_penalty).to(scores.dtype)
    scores, order = scores.sort(dim=-1, descending=True)  # (B, K)
    seqs = buf.view(batch, k, total).gather(1, order[:, :, None].expand(-1, -1, total))
    return seqs, scores
