"""THE demasking loop: the only place that calls the model during masked generation.

Each step (MaskGIT, Chang et al. 2022, https://arxiv.org/abs/2202.04200; Mask-Predict,
Ghazvininejad et al. 2019, https://arxiv.org/abs/1904.09324):
  1. one forward pass of the network (hidden states only);
  2. the output head on the candidate positions only (the still-masked ones, plus the revealed ones
     when re-masking is allowed), mask_id excluded, top-k filtering (filter_thres);
  3. one float64 Gumbel-max draw per candidate at temperature start_temperature * (T - j) / T;
  4. the remasking strategy (demask.samplers) picks which candidates are masked after the step, from
     the probabilities (one softmax) or, for strategies that use it, the token critic's scores plus
     annealed Gumbel noise;
  5. when a step changes no token (an ancestral step that reveals nothing), the next step reuses the
     logits and the network is not called again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from demask.samplers import Proposal, Sampler, StepInfo, gumbel_noise, sample_categorical
from demask.samplers.filters import top_k_compact
from demask.schedules import Schedule

__all__ = ["Guidance", "demask", "num_masked_after_step"]

_COUNT_EPS = 1e-9  # floor(L * m) in float64 absorbs rounding such as sin(pi / 6) * 64 = 31.99...


def num_masked_after_step(schedule: Schedule, step: int, steps: int, fillable: Tensor) -> Tensor:
    """(B,) long: floor(fillable_b * m(1 - step / steps)), the masked count after `step`."""
    m = _ratio(schedule, 1.0 - step / steps)
    return torch.floor(fillable.double() * m + _COUNT_EPS).long().clamp(min=0).minimum(fillable)


def _ratio(schedule: Schedule, t: float) -> float:
    return float(schedule.mask_ratio(torch.tensor(t, dtype=torch.float64)))


@dataclass
class Guidance:
    """Classifier-free guidance for masked decoding (Ho & Salimans 2022, arXiv 2207.12598; for
    masked diffusion: Schiff et al. 2024, arXiv 2412.10193, and LLaDA, arXiv 2502.09992).

    Each step the network is called twice: on the state (conditional logits c) and on the state
    with the condition's positions masked (unconditional logits u); the step samples from
    u + scale * (c - u). scale 0 is unconditional sampling, 1 conditional, > 1 strengthens the
    condition. Mixing logits or log-probabilities gives the same distribution (they differ by a
    constant per position).
    """

    scale: float
    drop: Tensor  # (B, N) bool: the condition's positions, masked for the unconditional call


@dataclass
class _Predictions:
    """The filtered predictions at the candidate positions of one model state."""

    rows: Tensor  # (M,)
    cols: Tensor  # (M,)
    logits: Tensor  # (M, K) kept logits
    vocab_index: Tensor | None  # (M, K) vocabulary id of each kept logit (None: K = V, identity)
    probs: Tensor  # (M, K) softmax(logits), computed once


class _Model:
    """The calls to the network, the critic and the self-conditioning projection."""

    def __init__(
        self, net, self_cond, token_critic, critic_head, net_kwargs, guidance=None
    ) -> None:
        self.net, self.self_cond = net, self_cond
        self.token_critic, self.critic_head = token_critic, critic_head
        self.kwargs = net_kwargs or {}
        self.guidance: Guidance | None = guidance
        self.prev_emb: list[Tensor | None] = [None, None]  # (B, N, dim) per branch (cond, uncond)

    @property
    def has_critic(self) -> bool:
        return self.token_critic is not None or self.critic_head is not None

    def hidden(self, seq: Tensor, branch: int = 0) -> Tensor:
        sum_embeds = None
        prev = self.prev_emb[branch]
        if self.self_cond is not None and prev is not None:
            sum_embeds = self.self_cond(prev)  # (B, N, emb_dim)
        emb = self.net(seq, return_embeddings=True, sum_embeds=sum_embeds, **self.kwargs)
        self.prev_emb[branch] = emb
        return emb  # (B, N, dim)

    def head(self, emb: Tensor) -> Tensor:
        to_logits = getattr(self.net, "logits_from_embeddings", None)
        return to_logits(emb) if to_logits is not None else self.net.to_logits(emb)

    def logits(self, seq: Tensor, rows: Tensor, cols: Tensor, mask_id: int) -> Tensor:
        """(M, V) float logits at positions (rows, cols) of `seq`, guided when asked."""
        cond = self.head(self.hidden(seq)[rows, cols]).float()  # the head only where needed
        if self.guidance is None:
            return cond
        uncond_seq = seq.masked_fill(self.guidance.drop, mask_id)
        uncond = self.head(self.hidden(uncond_seq, branch=1)[rows, cols]).float()
        return uncond + self.guidance.scale * (cond - uncond)

    def critic(self, seq: Tensor) -> Tensor:
        if self.token_critic is not None:
            return self.token_critic(seq, **self.kwargs).squeeze(-1)  # (B, N)
        emb = self.net(seq, return_embeddings=True, **self.kwargs)
        return self.critic_head(emb).squeeze(-1)  # (B, N)


def _predict(
    model: _Model,
    seq: Tensor,
    candidates: Tensor,
    mask_id: int,
    filter_thres: float,
    logits_filter: Callable[[Tensor], Tensor] | None,
) -> _Predictions:
    rows, cols = candidates.nonzero(as_tuple=True)  # (M,)
    logits = model.logits(seq, rows, cols, mask_id)  # (M, V)
    logits[:, mask_id] = -math.inf  # never propose the mask token
    vocab_index = None
    if logits_filter is not None:
        logits = logits_filter(logits)
    if filter_thres > 0:
        logits, vocab_index = top_k_compact(logits, thres=filter_thres)  # (M, k)
    return _Predictions(rows, cols, logits, vocab_index, logits.softmax(dim=-1))


def _prob_of(pred: _Predictions, tokens: Tensor) -> Tensor:
    """(M,) probability of vocabulary ids `tokens` under the filtered predictions."""
    if pred.vocab_index is None:
        return pred.probs.gather(-1, tokens[:, None]).squeeze(-1)
    return (pred.probs * (pred.vocab_index == tokens[:, None])).sum(-1)


@torch.no_grad()
def demask(
    net: nn.Module,
    seq: Tensor,
    *,
    mask_id: int,
    schedule: Schedule,
    steps: int,
    sampler: Sampler,
    start_temperature: float = 1.0,
    filter_thres: float = 0.7,
    logits_filter: Callable[[Tensor], Tensor] | None = None,
    anneal_temperature: bool = True,
    noise_level_scale: float = 1.0,
    can_mask_prev_unmasked: bool = False,
    self_cond: nn.Module | None = None,
    token_critic: nn.Module | None = None,
    critic_head: nn.Module | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], Any] | None = None,
    net_kwargs: dict[str, Any] | None = None,
    guidance: Guidance | None = None,
    frozen: Tensor | None = None,
) -> Tensor:
    """Fill every mask_id of `seq` (B, N) in `steps` steps; returns the filled (B, N) tokens.

    Tokens other than mask_id are never changed (conditioning, infilling). After step j the
    number of masked positions of row b is floor(F_b * m(1 - j / steps)) for exact-count
    strategies, F_b being the row's number of positions to fill. `callback(j, seq)` sees the
    state after every step (j = 1..steps; mask_id where still masked).
    `self_cond` (Linear dim -> emb_dim) feeds the previous pass's embeddings back via sum_embeds;
    `token_critic` (a network with one logit per position) or `critic_head` (Linear dim -> 1 on
    the net's own embeddings) scores each sampled token's chance of being wrong.
    `guidance`: classifier-free guidance (see `Guidance`). `frozen` (B, N) bool: positions never
    filled even when they hold mask_id (a dropped condition stays dropped).
    """
    seq = seq.clone()
    fillable = seq == mask_id  # (B, N)
    if frozen is not None:
        fillable &= ~frozen
    num_fillable = fillable.sum(-1)  # (B,)
    masked = fillable.clone()
    model = _Model(net, self_cond, token_critic, critic_head, net_kwargs, guidance)
    remask = can_mask_prev_unmasked and sampler.can_remask
    use_critic = sampler.uses_critic and model.has_critic
    pred: _Predictions | None = None

    for step in range(1, steps + 1):
        anneal = (steps - step) / steps
        temperature = start_temperature * anneal if anneal_temperature else start_temperature
        if pred is None:  # the state changed: one network call
            candidates = fillable if remask else masked
            pred = _predict(model, seq, candidates, mask_id, filter_thres, logits_filter)
        rows, cols = pred.rows, pred.cols

        local = sample_categorical(pred.logits, temperature, generator)  # (M,) index into K
        drawn = local if pred.vocab_index is None else pred.vocab_index.gather(-1, local[:, None])
        drawn = drawn.view(-1)  # (M,) vocabulary ids
        token_probs = pred.probs.gather(-1, local[:, None]).view(-1)  # (M,)
        if remask:  # revealed candidates keep their token: score that token instead
            was_masked = masked[rows, cols]  # (M,)
            tokens = torch.where(was_masked, drawn, seq[rows, cols])
            token_probs = torch.where(was_masked, token_probs, _prob_of(pred, tokens))
        else:  # every candidate is masked
            was_masked = torch.ones_like(drawn, dtype=torch.bool)
            tokens = drawn

        critic = None
        if use_critic:
            filled = seq.clone()
            filled[rows, cols] = tokens
            scores = model.critic(filled)[rows, cols].double()  # (M,)
            noise = gumbel_noise(scores.shape, generator=generator, device=scores.device)
            critic = scores + noise_level_scale * anneal * noise

        info = StepInfo(
            batch_size=seq.shape[0],
            num_masked_after=num_masked_after_step(schedule, step, steps, num_fillable),
            ratio_before=_ratio(schedule, 1.0 - (step - 1) / steps),
            ratio_after=_ratio(schedule, 1.0 - step / steps),
            generator=generator,
        )
        proposal = Proposal(rows, cols, was_masked, tokens, pred.probs, token_probs)
        proposal.critic = critic
        stay_masked = sampler.select(proposal, info)  # (M,) bool

        new_tokens = torch.where(stay_masked, torch.full_like(tokens, mask_id), tokens)
        if not torch.equal(new_tokens, seq[rows, cols]):
            seq[rows, cols] = new_tokens
            masked[rows, cols] = stay_masked
            pred = None  # the network sees the new state next step
        if callback is not None:
            callback(step, seq.clone())

    if bool(masked.any()):  # a schedule that ends above 0: reveal the rest greedily
        pred = _predict(model, seq, masked, mask_id, 0.0, None)
        best = pred.logits.argmax(-1)
        seq[pred.rows, pred.cols] = best
    return seq
