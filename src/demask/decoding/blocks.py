"""Semi-autoregressive block decoding of a masked model (LLaDA, Nie et al. 2025, arXiv 2502.09992;
Fast-dLLM, Wu et al. 2025, arXiv 2505.22618).

The canvas is cut into blocks of `size` positions, filled left to right; inside a block the
fillable positions are demasked in parallel by the one loop (`demask`), with ceil(steps / blocks)
steps per block, the blocks to the right still masked. With a `CachedDenoiser` each block's first
call records the keys and values that the block's later calls reuse.

Variable length: with `eos_id`, a row is finished once a filled block holds EOS; its fillable
positions after that EOS become EOS without a network call, and decoding stops when every row
is finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from demask._checks import check_int
from demask.decoding.masked import Decoded, demask
from demask.denoiser import Denoiser
from demask.samplers import MaskedSampler, MaskedState
from demask.schedules import Schedule

__all__ = ["Blocks", "demask_blocks"]


@dataclass(frozen=True)
class Blocks:
    size: int  # positions per block
    eos_id: int | None = None  # stop a row after the first block that holds this token

    def __post_init__(self) -> None:
        check_int("block_size", self.size, min=1)


@torch.no_grad()
def demask_blocks(
    model: Denoiser,
    state: MaskedState,
    schedule: Schedule,
    steps: int,
    sampler: MaskedSampler,
    blocks: Blocks,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor], Any] | None = None,
) -> Decoded:
    """Fill `state` block by block; `steps` is the total, shared equally by the blocks."""
    n = state.tokens.shape[1]
    num_blocks = math.ceil(n / blocks.size)
    per_block = math.ceil(steps / num_blocks)
    cols = torch.arange(n, device=state.tokens.device)
    tokens, fillable = state.tokens, state.fillable
    evaluations, done_steps = 0, 0
    for j in range(num_blocks):
        lo, hi = j * blocks.size, min(n, (j + 1) * blocks.size)
        in_block = fillable & (cols >= lo) & (cols < hi)  # (B, N)
        if not bool(in_block.any()):
            continue
        start = getattr(model, "start_block", None)
        if start is not None:
            start(lo, hi)
        watch = None if callback is None else _shifted(callback, done_steps)
        block_state = MaskedState(tokens, in_block, state.mask_id)
        result = demask(model, block_state, schedule, per_block, sampler, generator, watch)
        tokens, evaluations = result.tokens, evaluations + result.evaluations
        done_steps += per_block
        if blocks.eos_id is not None:
            tokens, finished = _finish_rows(tokens, fillable, cols < hi, blocks.eos_id)
            if finished:
                break
    filled = int(state.fillable.sum())
    return Decoded(tokens, evaluations, model.forwards, filled)


def _shifted(callback: Callable[[int, Tensor], Any], offset: int) -> Callable[[int, Tensor], Any]:
    return lambda step, tokens: callback(offset + step, tokens)


def _finish_rows(
    tokens: Tensor, fillable: Tensor, seen: Tensor, eos_id: int
) -> tuple[Tensor, bool]:
    """Rows whose filled positions (up to `seen` (N,)) hold EOS: every fillable position after
    their first EOS becomes EOS. Returns the tokens and whether every row is finished."""
    eos = (tokens == eos_id) & fillable & seen  # (B, N)
    has_eos = eos.any(-1)  # (B,)
    if not bool(has_eos.any()):
        return tokens, False
    n = tokens.shape[1]
    cols = torch.arange(n, device=tokens.device)
    first = torch.where(eos, cols, n).amin(-1)  # (B,) n where none
    rest = fillable & (cols[None, :] > first[:, None])
    return tokens.masked_fill(rest, eos_id), bool(has_eos.all())
