"""`MaskedSampler`: one step of masked decoding, from the network's logits to the next state.

The diffusers scheduler pattern: the sampler owns its settings (temperature and its annealing,
top-k, the critic's noise scale, which positions are candidates, the `RevealRule` that says how
many and which to reveal) and has one `step(logits, state, times, generator)`. It never calls the
network; the one loop (`demask.decoding.masked.demask`) does, at `sampler.candidates(state)`.

Per step (MaskGIT, Chang et al. 2022, https://arxiv.org/abs/2202.04200; Mask-Predict,
Ghazvininejad et al. 2019, https://arxiv.org/abs/1904.09324):
  1. at the candidates: mask_id excluded, `allowed_tokens`, top-k (`filter_thres`), one softmax;
  2. one float64 Gumbel-max draw per candidate at temperature
     `temperature * (steps - step) / steps` (or `temperature` with `anneal=False`);
  3. with a critic and a rule that uses it: the critic scores the filled canvas, plus
     `noise_scale * (steps - step) / steps` Gumbel noise (Lezama et al. 2022, arXiv 2209.04439);
  4. the rule picks which candidates are masked after the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from demask._checks import check_float
from demask.samplers.base import Logits, MaskedState, Proposal, RevealRule, StepInfo, StepTimes
from demask.samplers.categorical import gumbel_noise, sample_categorical
from demask.samplers.filters import top_k_compact

__all__ = ["Critic", "MaskedSampler"]

Critic = Callable[[Tensor], Tensor]  # (B, N) tokens -> (B, N) scores, higher = more likely wrong


@dataclass
class MaskedSampler:
    """A masked-decoding sampler; the seed's `generate` arguments map onto its fields.

    rule: how many candidates and which are revealed (demask.samplers.RULES).
    temperature: the seed's start_temperature; annealed linearly to 0 when `anneal`.
    filter_thres: the seed's top-k filter (keeps ceil((1 - thres) V) logits; 0 keeps all).
    allowed_tokens: (V,) or (N, V) bool, the tokens every position (or each of the N positions)
      may hold; the others are never drawn (e.g. a class token only in the class slot).
    noise_scale: the seed's noise_level_scale, Gumbel noise on the critic's scores.
    remask: revealed tokens are candidates too (the seed's can_mask_prev_unmasked, for rules that
      can re-mask; rules with `always_remask` re-mask whatever this says).
    """

    rule: RevealRule
    temperature: float = 1.0
    anneal: bool = True
    filter_thres: float = 0.7
    allowed_tokens: Tensor | None = None
    noise_scale: float = 1.0
    remask: bool = False
    # (table, (N, V, mask_id, device), the table checked and on that device): checked once per
    # canvas, not at every step
    _allowed: tuple[Any, tuple, Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        check_float("temperature", self.temperature, min=0.0)
        check_float("filter_thres", self.filter_thres, min=0.0, max=1.0, max_inclusive=False)
        check_float("noise_scale", self.noise_scale, min=0.0)
        allowed = self.allowed_tokens
        if allowed is not None and not (
            isinstance(allowed, Tensor) and allowed.dtype == torch.bool and allowed.ndim in (1, 2)
        ):
            got = (
                f"{allowed.dtype} of shape {tuple(allowed.shape)}"
                if isinstance(allowed, Tensor)
                else type(allowed).__name__
            )
            raise ValueError(f"allowed_tokens must be a (V,) or (N, V) bool tensor, got {got}")

    @property
    def remasks(self) -> bool:
        return self.rule.always_remask or (self.remask and self.rule.can_remask)

    def candidates(self, state: MaskedState) -> Tensor:
        """(B, N) bool: the positions whose logits `step` needs."""
        return state.fillable if self.remasks else state.masked

    def step(
        self,
        logits: Logits,
        state: MaskedState,
        times: StepTimes,
        generator: torch.Generator | None = None,
        critic: Critic | None = None,
    ) -> MaskedState:
        """The next state; `logits` are the network's at `candidates(state)`."""
        proposal = self.propose(logits, state, times, generator)
        if critic is not None and self.rule.uses_critic:
            filled = state.tokens.clone()
            filled[proposal.rows, proposal.cols] = proposal.tokens
            scores = critic(filled)[proposal.rows, proposal.cols].double()  # (M,)
            noise = gumbel_noise(scores.shape, generator=generator, device=scores.device)
            proposal.critic = scores + self.noise_scale * times.anneal * noise
        fillable = state.fillable.sum(-1)  # (B,)
        info = StepInfo(
            batch_size=state.tokens.shape[0],
            num_masked_after=times.num_masked_after(fillable),
            ratio_before=times.ratio_before,
            ratio_after=times.ratio_after,
            generator=generator,
            seq_len=state.tokens.shape[1],
        )
        stay_masked = self.rule.select(proposal, info)  # (M,)
        tokens = state.tokens.clone()
        tokens[proposal.rows, proposal.cols] = proposal.tokens.masked_fill(
            stay_masked, state.mask_id
        )
        return state.with_tokens(tokens)

    def propose(
        self,
        logits: Logits,
        state: MaskedState,
        times: StepTimes,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Draw a token for every masked candidate; revealed candidates keep theirs."""
        rows, cols = logits.rows, logits.cols
        values = logits.values.float().clone()  # (M, V)
        values[:, state.mask_id] = -math.inf  # never propose the mask token
        if self.allowed_tokens is not None:
            allowed = self._allowed_on(self.allowed_tokens, state, values.shape[-1], values.device)
            if allowed.ndim == 2:
                allowed = allowed[cols]  # (M, V): the row of each candidate's position
            values = values.masked_fill(~allowed, -math.inf)
        vocab_index = None
        if self.filter_thres > 0:
            values, vocab_index = top_k_compact(values, thres=self.filter_thres)  # (M, K)
        probs = values.softmax(dim=-1)
        temperature = self.temperature * times.anneal if self.anneal else self.temperature
        local = sample_categorical(values, temperature, generator)  # (M,) index into K
        drawn = local if vocab_index is None else vocab_index.gather(-1, local[:, None])
        drawn = drawn.view(-1)  # (M,) vocabulary ids
        token_probs = probs.gather(-1, local[:, None]).view(-1)  # (M,)
        was_masked = state.tokens[rows, cols] == state.mask_id  # (M,)
        tokens = drawn
        if not bool(was_masked.all()):  # revealed candidates: score the token they hold
            tokens = torch.where(was_masked, drawn, state.tokens[rows, cols])
            held = _prob_of(probs, vocab_index, tokens)
            token_probs = torch.where(was_masked, token_probs, held)
        return Proposal(rows, cols, was_masked, tokens, probs, token_probs)

    def _allowed_on(
        self, table: Tensor, state: MaskedState, vocab: int, device: torch.device
    ) -> Tensor:
        """`allowed_tokens` checked against the canvas and the vocabulary and moved to `device`,
        once for a canvas shape (the steps of one decoding reuse it)."""
        key = (state.tokens.shape[1], vocab, state.mask_id, device)
        if self._allowed is None or self._allowed[0] is not table or self._allowed[1] != key:
            self._allowed = (table, key, _allowed_at(table, state, vocab).to(device))
        return self._allowed[2]


def _allowed_at(allowed: Tensor, state: MaskedState, vocab: int) -> Tensor:
    """`allowed_tokens`, checked against the canvas (B, N) and the vocabulary V."""
    n = state.tokens.shape[1]
    expected = (vocab,) if allowed.ndim == 1 else (n, vocab)
    if tuple(allowed.shape) != expected:
        raise ValueError(
            f"allowed_tokens must have shape ({vocab},) or ({n}, {vocab}) (the vocabulary, or the "
            f"canvas's positions by the vocabulary), got {tuple(allowed.shape)}"
        )
    drawable = allowed.clone()
    drawable[..., state.mask_id] = False
    if not bool(drawable.any(-1).all()):
        raise ValueError("allowed_tokens leaves a position no token to draw but mask_id")
    return allowed


def _prob_of(probs: Tensor, vocab_index: Tensor | None, tokens: Tensor) -> Tensor:
    """(M,) probability of vocabulary ids `tokens` under the filtered predictions."""
    if vocab_index is None:
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    return (probs * (vocab_index == tokens[:, None])).sum(-1)
