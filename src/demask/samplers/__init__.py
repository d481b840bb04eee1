"""Samplers: logits filters, categorical sampling, and the remasking strategies of masked decoding.

Samplers never call the model; they turn logits and the current state into the next state.
"""

from demask.samplers.categorical import gumbel_noise, sample_categorical
from demask.samplers.filters import FILTERS, min_p, top_a, top_k, top_k_count, top_p

__all__ = [
    "FILTERS",
    "gumbel_noise",
    "min_p",
    "sample_categorical",
    "top_a",
    "top_k",
    "top_k_count",
    "top_p",
]
