"""The pieces of `NonAutoregressiveWrapper.generate`: its start canvas, options and output.

Kept beside the wrapper so that the wrapper reads as the seed's API; the loop itself lives in
demask.decoding (masked.demask, blocks.demask_blocks).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from demask._checks import check_choice, check_float, check_int, check_tokens
from demask.decoding.block_cache import CACHES, CachedDenoiser
from demask.decoding.blocks import Blocks
from demask.decoding.masked import Decoded, demask
from demask.denoiser import Denoiser, Guidance
from demask.samplers import MaskedSampler, MaskedState
from demask.schedules import Schedule

__all__ = ["block_options", "denoiser", "draw_condition", "initial_state", "output", "start_canvas"]


def start_canvas(
    batch_size: int | None,
    prompt: Tensor | None,
    seq_len: int | None,
    *,
    mask_id: int,
    num_tokens: int,
    max_seq_len: int,
    device: torch.device,
) -> tuple[Tensor, bool]:
    """The initial (B, N) canvas and whether to drop the batch dimension at the end."""
    if prompt is None:
        n = max_seq_len if seq_len is None else seq_len
        check_int("seq_len", n, min=1, max=max_seq_len)
        b = 1 if batch_size is None else batch_size
        canvas = torch.full((b, n), mask_id, dtype=torch.long, device=device)
        return canvas, batch_size is None
    n = prompt.shape[-1] if (isinstance(prompt, Tensor) and prompt.ndim) else max_seq_len
    if seq_len is not None:
        n = check_int("seq_len", seq_len, min=1, max=max_seq_len)
    prompt = check_tokens(
        "prompt", prompt, num_tokens=num_tokens, ndim=(1, 2), seq_len=n, nonempty=True
    )
    if n > max_seq_len:
        raise ValueError(f"prompt length must be <= max_seq_len={max_seq_len}, got {n}")
    prompt = prompt.to(device)
    if prompt.ndim == 1:
        b = 1 if batch_size is None else batch_size
        return prompt[None].expand(b, n).clone(), batch_size is None
    if batch_size is not None and batch_size != prompt.shape[0]:
        raise ValueError(
            f"batch_size={batch_size} does not match prompt of shape {tuple(prompt.shape)}"
        )
    return prompt.clone(), False


def draw_condition(
    model: Denoiser,
    seq: Tensor,
    prefix: Tensor,
    mask_id: int,
    loop: tuple[Schedule, MaskedSampler, torch.Generator | None],
) -> tuple[Tensor, Decoded | None]:
    """A dropped condition drawn before the rest, for a model trained with predict_dropped_cond.

    The masked positions of `prefix` (B, N) are filled first, by the loop in as many steps as the
    condition has positions, with every other position of the canvas masked as given; the rest
    is then decoded given that condition, like a condition given by the user (and guided by it).
    This samples p(condition) p(rest | condition): the order the model knows best, since it is
    trained on whole conditions in most rows. The condition is drawn from the model's own
    distribution: the sampler's rule and allowed tokens, at temperature 1 without top-k or
    annealing. A lower temperature there would only drop the conditions the model is less sure
    of (the demo's digits: docs/CLI.md). Returns the canvas and the pass's record (None when no
    condition was dropped).
    """
    fillable = prefix & (seq == mask_id)
    if not bool(fillable.any()):
        return seq, None
    schedule, sampler, generator = loop
    own = replace(sampler, temperature=1.0, anneal=False, filter_thres=0.0)
    steps = int(fillable.sum(-1).max())
    drawn = demask(model, MaskedState(seq, fillable, mask_id), schedule, steps, own, generator)
    return drawn.tokens, drawn


def initial_state(
    seq: Tensor, mask_id: int, prefix: Tensor | None, guidance_scale: float | None
) -> tuple[MaskedState, Guidance | None]:
    """The decoding state of a start canvas (B, N), and the guidance it asks for.

    prefix (B, N) bool: the condition's positions (cond_prefix_len), or None: then every given
    token is the condition. A condition position holding mask_id is a dropped condition: it is
    not filled (a model trained with predict_dropped_cond has it drawn first, `draw_condition`).
    The history and callback of `generate` show only the steps after that pass; its stats count
    the pass's network calls and filled tokens too (`output`).
    """
    given = seq != mask_id  # (B, N)
    fillable = ~given
    if prefix is not None:
        fillable &= ~prefix  # a dropped condition stays dropped
        given = given & prefix
    state = MaskedState(seq, fillable, mask_id)
    if guidance_scale is None:
        return state, None
    scale = float(guidance_scale)  # its value checked by `generate`, before any network call
    if not bool(given.any()):
        raise ValueError(
            "guidance_scale needs a condition to guide by: a prompt with given tokens "
            f"(or a class token with cond_prefix_len > 0), got guidance_scale={scale} "
            "and no given token"
        )
    return state, Guidance(scale, given)


def block_options(
    block_size: int | None,
    cache: str | None,
    eos: tuple[int | None, float],
    mask_id: int,
    num_tokens: int,
) -> Blocks | None:
    """The block options of `generate`, checked; `eos` = (eos_id, eos_penalty)."""
    eos_id, eos_penalty = eos
    if eos_id is not None:
        check_int("eos_id", eos_id, min=0, max=num_tokens - 1)
    if eos_id is not None and eos_id == mask_id:
        raise ValueError(f"eos_id must not be the mask id {mask_id}")
    if check_float("eos_penalty", eos_penalty, min=0.0) and eos_id is None:
        raise ValueError("eos_penalty needs eos_id, the token it penalises")
    if cache is not None:
        check_choice("cache", cache, CACHES)
        if block_size is None:
            raise ValueError(f"cache={cache!r} needs block_size: it caches around a block")
    if block_size is None:
        return None
    return Blocks(check_int("block_size", block_size, min=1), eos_id)


def denoiser(
    parts: tuple[nn.Module, nn.Module | None, nn.Module | None, nn.Module | None, dict],
    guidance: Guidance | None,
    cache: str | None,
    eos: tuple[int | None, float],
    num_tokens: int,
) -> Denoiser:
    """The loop's Denoiser (cached for block decoding), with the EOS penalty as a logit bias."""
    model = (
        Denoiser(*parts, guidance)
        if cache is None
        else CachedDenoiser(*parts, guidance, cache=cache)
    )
    eos_id, penalty = eos
    if eos_id is not None and penalty:
        device = next(parts[0].parameters()).device
        model.logit_bias = torch.zeros(num_tokens, device=device)
        model.logit_bias[eos_id] = -penalty
    return model


def output(
    result: Decoded,
    squeeze: bool,
    history: list[Tensor] | None,
    stats: bool,
    drawn: Decoded | None = None,
) -> Tensor | tuple[Any, ...]:
    """generate's return value: tokens, then the history and the stats when asked for. `drawn`:
    the record of the condition's pass (`draw_condition`), whose costs the stats include."""
    if drawn is not None:
        result.evaluations += drawn.evaluations
        result.forwards += drawn.forwards
        result.filled += drawn.filled
    out = result.tokens[0] if squeeze else result.tokens
    extras: list[Any] = []
    if history is not None:
        states = torch.stack(history)  # (steps, B, N)
        extras.append(states[:, 0] if squeeze else states)
    if stats:
        extras.append(result)
    return (out, *extras) if extras else out
