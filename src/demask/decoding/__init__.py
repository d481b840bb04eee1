"""Decoding loops: the only places that call the model during generation."""

from demask.decoding.autoregressive import (
    FILTER_FUNCTIONS,
    ModelStepper,
    SamplingOptions,
    iter_decode,
    select_tokens,
)
from demask.decoding.beam import beam_search
from demask.decoding.blocks import Blocks, demask_blocks
from demask.decoding.masked import Decoded, Guidance, demask, num_masked_after_step

__all__ = [
    "FILTER_FUNCTIONS",
    "Blocks",
    "Decoded",
    "Guidance",
    "ModelStepper",
    "SamplingOptions",
    "beam_search",
    "demask",
    "demask_blocks",
    "iter_decode",
    "num_masked_after_step",
    "select_tokens",
]
