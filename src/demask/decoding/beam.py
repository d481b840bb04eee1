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
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from demask.decoding.autoregressive import ModelStepper, Running, SamplingOptions, Stopping
from demask.samplers.categorical import gumbel_noise

__all__ = ["BeamOptions", "beam_search"]


@dataclass
class BeamOptions:
    """beams: K hypotheses per row; length_penalty: see the module docstring; stochastic: when
    given (the seed's `stochastic=True`), hypotheses are chosen by Gumbel-perturbed scores
    instead of the scores themselves (sampling K continuations without replacement at each step,
    Kool et al. 2019, https://arxiv.org/abs/1903.06059, in its simple per-step form): the
    perturbation is log softmax(filter(logits) / temperature) + Gumbel noise from the options'
    generator, while the scores kept and returned stay the model's log-probabilities."""

    beams: int = 4
    length_penalty: float = 0.0
    stochastic: SamplingOptions | None = None


def _selection_keys(cand: Tensor, logits: Tensor, scores: Tensor, opts: SamplingOptions) -> Tensor:
    """Perturbed keys (B, K, V) for stochastic beam search; cand holds the true scores."""
    if opts.temperature == 0.0:  # greedy: no noise
        return cand
    batch, k, vocab = cand.shape
    filtered = opts.filter_fn(logits) if opts.filter_fn is not None else logits  # (B*K, V)
    logq = (filtered.double() / opts.temperature).log_softmax(dim=-1).view(batch, k, vocab)
    noise = gumbel_noise(logq.shape, generator=opts.generator, device=logq.device)
    keys = (scores[:, :, None] + logq + noise).to(cand.dtype)
    return torch.where(torch.isfinite(cand), keys, cand)  # keep -inf (and frozen) entries


def beam_search(
    net: nn.Module,
    prompts: Tensor,
    seq_len: int,
    beam: BeamOptions,
    *,
    start_pos: Tensor | None = None,
    stopping: Stopping | None = None,
    running: Running | None = None,
) -> tuple[Tensor, Tensor]:
    """Beam search from left-aligned prompts (B, P); arguments are assumed validated.

    Returns (sequences (B, K, P + S), scores (B, K)), the K hypotheses of each row best first;
    scores are total log-probabilities (nats), divided by length ** length_penalty when it is set.
    Only `stopping.eos_token` and `pad_value` are used (no stop sequences).
    """
    stopping = stopping or Stopping()
    eos_token, pad_value = stopping.eos_token, stopping.pad_value
    batch, prompt_len = prompts.shape
    k = beam.beams
    total = prompt_len + seq_len
    device = prompts.device
    buf = torch.full((batch * k, total), pad_value, dtype=torch.long, device=device)
    buf[:, :prompt_len] = prompts.repeat_interleave(k, dim=0)  # rows b*K .. b*K + K-1
    starts = start_pos.repeat_interleave(k, dim=0) if start_pos is not None else None
    vocab = cast(int, net.num_tokens)
    stepper = ModelStepper(net, buf, prompt_len, starts, running or Running())
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
        keys = cand
        if beam.stochastic is not None:
            keys = _selection_keys(cand, logits, scores, beam.stochastic)
            keys = torch.where(finished[:, :, None], cand, keys)  # finished: no noise
        flat_idx = keys.view(batch, k * vocab).topk(k, dim=-1).indices  # (B, K)
        scores = cand.view(batch, k * vocab).gather(1, flat_idx)
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

    if beam.length_penalty:
        penalty = lengths.clamp(min=1).double().pow(beam.length_penalty)
        scores = scores / penalty.to(scores.dtype)
    scores, order = scores.sort(dim=-1, descending=True)  # (B, K)
    seqs = buf.view(batch, k, total).gather(1, order[:, :, None].expand(-1, -1, total))
    return seqs, scores
