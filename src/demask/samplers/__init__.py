"""Samplers: logits filters, categorical sampling, and the remasking strategies of masked decoding.

Samplers never call the model; they turn logits and the current state into the next state.
A new remasking strategy is one file plus one line in `SAMPLERS`; tests/test_samplers.py runs
over every entry.
"""

from __future__ import annotations

from demask._checks import check_choice
from demask.samplers.ancestral import AncestralSampler
from demask.samplers.base import Proposal, Sampler, StepInfo, mask_least_confident
from demask.samplers.categorical import gumbel_noise, sample_categorical
from demask.samplers.confidence import ConfidenceSampler
from demask.samplers.entropy import EntropySampler
from demask.samplers.filters import (
    min_p,
    top_a,
    top_k,
    top_k_compact,
    top_k_count,
    top_p,
)
from demask.samplers.low_confidence import LowConfidenceSampler
from demask.samplers.margin import MarginSampler
from demask.samplers.random_order import RandomSampler

# name -> remasking strategy class (no arguments); `generate(..., sampler=name)`
SAMPLERS: dict[str, type] = {
    "confidence": ConfidenceSampler,
    "low_confidence": LowConfidenceSampler,
    "random": RandomSampler,
    "margin": MarginSampler,
    "entropy": EntropySampler,
    "ancestral": AncestralSampler,
}


def get_sampler(sampler: str | Sampler) -> Sampler:
    """A remasking strategy from its registry name, or a strategy object passed through."""
    if isinstance(sampler, str):
        return SAMPLERS[check_choice("sampler", sampler, SAMPLERS)]()
    if not callable(getattr(sampler, "select", None)):
        raise TypeError(f"sampler must be one of {sorted(SAMPLERS)} or a Sampler, got {sampler!r}")
    return sampler


__all__ = [
    "SAMPLERS",
    "AncestralSampler",
    "ConfidenceSampler",
    "EntropySampler",
    "LowConfidenceSampler",
    "MarginSampler",
    "Proposal",
    "RandomSampler",
    "Sampler",
    "StepInfo",
    "get_sampler",
    "gumbel_noise",
    "mask_least_confident",
    "min_p",
    "sample_categorical",
    "top_a",
    "top_k",
    "top_k_compact",
    "top_k_count",
    "top_p",
]
