"""THE demasking loop: the only place that calls the network during masked generation.

Each step: one network evaluation at the sampler's candidate positions (`Denoiser.logits`), then
`sampler.step` (demask.samplers.MaskedSampler) turns the logits into the next state. When a step
changes no token (an ancestral step that reveals nothing) the next step reuses the logits, and
once nothing is masked the network is not called again. The number of network evaluations is a
result: adaptive rules (threshold, factor, entropy_bound) reveal as many tokens per evaluation as
their confidence allows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from demask.denoiser import Denoiser, Guidance
from demask.samplers import Logits, MaskedSampler, MaskedState, StepTimes
from demask.schedules import Schedule

__all__ = ["Decoded", "Guidance", "demask", "num_masked_after_step", "step_times"]


def _ratio(schedule: Schedule, t: float) -> float:
    return float(schedule.mask_ratio(torch.tensor(t, dtype=torch.float64)))


def step_times(schedule: Schedule, step: int, steps: int) -> StepTimes:
    """Step `step` of `steps`: from time 1 - (step - 1) / steps to 1 - step / steps."""
    before = _ratio(schedule, 1.0 - (step - 1) / steps)
    return StepTimes(step, steps, before, _ratio(schedule, 1.0 - step / steps))


def num_masked_after_step(schedule: Schedule, step: int, steps: int, fillable: Tensor) -> Tensor:
    """(B,) long: floor(fillable_b * m(1 - step / steps)), the masked count after `step`."""
    return step_times(schedule, step, steps).num_masked_after(fillable)


@dataclass
class Decoded:
    """The filled canvas and what it cost."""

    tokens: Tensor  # (B, N) long
    evaluations: int  # network evaluations (a guided evaluation is one, of two forward passes)
    forwards: int  # forward passes of the net and the critic network
    filled: int  # tokens the decoder filled (the fillable positions of the batch)

    @property
    def evaluations_per_token(self) -> float:
        """Network evaluations per generated token, counted per row (the batch runs in parallel):
        evaluations / (filled / B)."""
        rows = self.tokens.shape[0]
        return self.evaluations * rows / max(self.filled, 1)


@torch.no_grad()
def demask(
    model: Denoiser,
    state: MaskedState,
    schedule: Schedule,
    steps: int,
    sampler: MaskedSampler,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], Any] | None = None,
) -> Decoded:
    """Fill every masked position of `state` in at most `steps` steps.

    Positions outside `state.fillable` never change (conditioning, infilling). `callback(j, seq)`
    sees the (B, N) canvas after every step j = 1..steps (mask_id where still masked).
    """
    critic = model.critic if model.has_critic else None
    logits: Logits | None = None
    evaluations = 0
    for step in range(1, steps + 1):
        if bool(state.masked.any()):
            if logits is None:  # the state changed: one network evaluation
                logits = model.logits(state, sampler.candidates(state))
                evaluations += 1
            times = step_times(schedule, step, steps)
            new = sampler.step(logits, state, times, generator, critic)
            if not torch.equal(new.tokens, state.tokens):
                logits = None  # the network sees the new state next step
            state = new
        if callback is not None:
            callback(step, state.tokens.clone())

    tokens = state.tokens
    if bool(state.masked.any()):  # a schedule that ends above 0: reveal the rest greedily
        rest = model.logits(state, state.masked)
        evaluations += 1
        values = rest.values.clone()
        values[:, state.mask_id] = -torch.inf
        tokens = tokens.clone()
        tokens[rest.rows, rest.cols] = values.argmax(-1)
    filled = int(state.fillable.sum())
    return Decoded(tokens, evaluations, model.forwards, filled)
