"""Samplers: logits filters, categorical sampling, and masked decoding's sampler and reveal rules.

`MaskedSampler` is the masked decoder's sampler (the `step()` contract); a `RevealRule` decides
how many candidates and which are revealed at each step. A new rule is one file plus one line in
`RULES`; tests/test_samplers.py runs over every entry. Nothing here calls a model.
"""

from __future__ import annotations

from typing import Any

from demask._checks import check_choice
from demask.samplers.ancestral import AncestralRule
from demask.samplers.base import (
    Logits,
    MaskedState,
    Proposal,
    RevealRule,
    StepInfo,
    StepTimes,
    mask_least_confident,
)
from demask.samplers.categorical import gumbel_noise, sample_categorical
from demask.samplers.confidence import ConfidenceRule
from demask.samplers.dilated import DilatedRule
from demask.samplers.entropy import EntropyRule
from demask.samplers.entropy_bound import EntropyBoundRule
from demask.samplers.factor import FactorRule
from demask.samplers.filters import (
    min_p,
    top_a,
    top_k,
    top_k_compact,
    top_k_count,
    top_p,
)
from demask.samplers.halton import HaltonRule
from demask.samplers.low_confidence import LowConfidenceRule
from demask.samplers.margin import MarginRule
from demask.samplers.masked import Critic, MaskedSampler
from demask.samplers.random_order import RandomRule
from demask.samplers.remdm import ReMDMRule
from demask.samplers.threshold import ThresholdRule

# name -> reveal rule class (its settings all have defaults); `generate(..., sampler=name)`
RULES: dict[str, type] = {
    "confidence": ConfidenceRule,
    "low_confidence": LowConfidenceRule,
    "random": RandomRule,
    "margin": MarginRule,
    "entropy": EntropyRule,
    "ancestral": AncestralRule,
    "threshold": ThresholdRule,
    "factor": FactorRule,
    "entropy_bound": EntropyBoundRule,
    "remdm": ReMDMRule,
    "halton": HaltonRule,
    "dilated": DilatedRule,
}


def get_rule(rule: str | RevealRule, **options: Any) -> RevealRule:
    """A reveal rule from its registry name (with its settings), or a rule object passed through."""
    if isinstance(rule, str):
        return RULES[check_choice("sampler", rule, RULES)](**options)
    if not callable(getattr(rule, "select", None)):
        raise TypeError(f"sampler must be one of {sorted(RULES)} or a RevealRule, got {rule!r}")
    if options:
        raise ValueError(f"settings {sorted(options)} are for a rule given by name")
    return rule


__all__ = [
    "RULES",
    "AncestralRule",
    "ConfidenceRule",
    "Critic",
    "DilatedRule",
    "EntropyBoundRule",
    "EntropyRule",
    "FactorRule",
    "HaltonRule",
    "Logits",
    "LowConfidenceRule",
    "MarginRule",
    "MaskedSampler",
    "MaskedState",
    "Proposal",
    "RandomRule",
    "ReMDMRule",
    "RevealRule",
    "StepInfo",
    "StepTimes",
    "ThresholdRule",
    "get_rule",
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
