"""Prompt handling for autoregressive decoding: validation, left alignment, and the output layout.

Prompts come as
- a (B, P) tensor of equal-length prompts (or a 1-D (P,) tensor: one prompt, 1-D output);
- a (B, P) tensor plus `prompt_lens` (B,): right-padded prompts, row b's prompt is
  prompts[b, :prompt_lens[b]];
- a list of 1-D tensors of any lengths.
Inside, every batch is left-aligned: shorter prompts are left-padded with `pad_value` and
`start_pos` (B,) says where each row's real tokens start (the backbone masks the padding and
shifts the positions, so a padded row decodes exactly as it would alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from demask._checks import check_int, check_tokens

__all__ = ["PreparedPrompts", "check_stop_sequences", "prepare_prompts"]


@dataclass
class PreparedPrompts:
    tokens: Tensor  # (B, P) long, left-aligned, left-padded with pad_value
    start_pos: Tensor | None  # (B,) long index of each row's first real token; None: no padding
    lengths: Tensor  # (B,) long real prompt lengths
    kind: str  # "tensor", "vector" (a 1-D prompt) or "list": how to shape the output

    def format(self, buf: Tensor, prompt_len: int, only_new: bool) -> Tensor | list[Tensor]:
        """The user-facing output of a filled buffer buf (B, P + S), or of beams (B, K, P + S).

        tensor input: (B, P + S), or (B, S) with only_new; rows right-aligned when prompt_lens was
        given. 1-D input: the same without the batch dimension. list input: a list of 1-D tensors,
        row b's own prompt followed by its S new tokens (or just the new tokens).
        """
        out = buf[..., prompt_len:] if only_new else buf
        if self.kind == "vector":
            return out[0]
        if self.kind == "tensor" or only_new:
            return list(out.unbind(0)) if self.kind == "list" else out
        starts = (prompt_len - self.lengths).tolist()
        return [row[..., s:] for row, s in zip(out.unbind(0), starts)]


def _left_align(prompts: Tensor, lengths: Tensor, pad_value: int) -> Tensor:
    """Right-padded rows (B, P) with real lengths (B,) -> the same rows left-padded."""
    width = prompts.shape[1]
    shift = width - lengths  # (B,)
    cols = torch.arange(width, device=prompts.device)
    src = (cols[None, :] - shift[:, None]).clamp(min=0)  # (B, P)
    out = prompts.gather(1, src)
    return out.masked_fill(cols[None, :] < shift[:, None], pad_value)


def prepare_prompts(
    prompts: Any, prompt_lens: Any, *, num_tokens: int, pad_value: int
) -> PreparedPrompts:
    """Validate prompts (naming the bad argument) and left-align them; see the module docstring."""
    if isinstance(prompts, (list, tuple)):
        if prompt_lens is not None:
            raise ValueError("prompt_lens is for a padded (B, P) prompts tensor, not a list")
        return _from_list(prompts, num_tokens, pad_value)
    if not isinstance(prompts, Tensor):
        raise TypeError(
            f"prompts must be a tensor of token ids or a list of 1-D tensors, got {type(prompts).__name__}"
        )
    kind = "vector" if prompts.ndim == 1 else "tensor"
    if prompts.ndim == 1:
        prompts = prompts[None]
    if prompts.ndim != 2:
        raise ValueError(f"prompts must have 1 or 2 dimensions, got shape {tuple(prompts.shape)}")
    if prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise ValueError(
            f"prompts is empty (shape {tuple(prompts.shape)}): every prompt needs at least one token"
        )
    if prompt_lens is None:
        prompts = check_tokens("prompts", prompts, num_tokens=num_tokens)  # long
        width = prompts.shape[1]
        lengths = torch.full((prompts.shape[0],), width, dtype=torch.long, device=prompts.device)
        return _finish(prompts, lengths, kind)
    return _finish(*_from_padded(prompts, prompt_lens, num_tokens, pad_value), kind)


def _from_list(prompts: Sequence[Any], num_tokens: int, pad_value: int) -> PreparedPrompts:
    """A list of 1-D prompts of any lengths -> left-padded rows."""
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list: give at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        p = check_tokens(f"prompts[{i}]", p, num_tokens=num_tokens, ndim=1)
        if p.shape[0] == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        rows.append(p)
    lengths = torch.tensor([r.shape[0] for r in rows], device=rows[0].device)
    width = int(lengths.max())
    tokens = torch.full((len(rows), width), pad_value, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        tokens[i, width - r.shape[0] :] = r
    return _finish(tokens, lengths, "list")


def _from_padded(
    prompts: Tensor, prompt_lens: Any, num_tokens: int, pad_value: int
) -> tuple[Tensor, Tensor]:
    """Right-padded (B, P) prompts with their lengths -> (left-aligned tokens, lengths)."""
    width = prompts.shape[1]
    if not isinstance(prompt_lens, Tensor):
        prompt_lens = torch.as_tensor(prompt_lens)
    integer = not (prompt_lens.dtype.is_floating_point or prompt_lens.dtype.is_complex)
    if prompt_lens.shape != (prompts.shape[0],) or not integer or prompt_lens.dtype == torch.bool:
        raise ValueError(
            f"prompt_lens must be {prompts.shape[0]} integer lengths (one per prompt row), got "
            f"{prompt_lens.dtype} of shape {tuple(prompt_lens.shape)}"
        )
    lo, hi = int(prompt_lens.min()), int(prompt_lens.max())
    if lo < 1 or hi > width:
        raise ValueError(
            f"prompt_lens must lie in [1, {width}] (the prompts width), got [{lo}, {hi}]"
        )
    lengths = prompt_lens.to(device=prompts.device, dtype=torch.long)
    real = torch.arange(width, device=prompts.device)[None, :] < lengths[:, None]  # (B, P)
    # the padding after each prompt may hold anything; the dtype rule holds for the whole tensor
    check_tokens("prompts", prompts.masked_fill(~real, 0), num_tokens=num_tokens)
    return _left_align(prompts.long(), lengths, pad_value), lengths


def _finish(tokens: Tensor, lengths: Tensor, kind: str) -> PreparedPrompts:
    start = tokens.shape[1] - lengths
    start_pos = start if bool((start > 0).any()) else None
    return PreparedPrompts(tokens, start_pos, lengths, kind)


def check_stop_sequences(
    stop_sequences: Sequence[Any] | None, *, num_tokens: int, device: torch.device
) -> list[Tensor]:
    """A list of token sequences (lists or 1-D tensors) -> validated 1-D long tensors."""
    if stop_sequences is None:
        return []
    if isinstance(stop_sequences, Tensor) or not isinstance(stop_sequences, (list, tuple)):
        raise TypeError(
            "stop_sequences must be a list of token sequences (lists or 1-D tensors), got "
            f"{type(stop_sequences).__name__}"
        )
    out = []
    for i, seq in enumerate(stop_sequences):
        t = torch.as_tensor(seq, device=device)
        if t.ndim != 1 or t.shape[0] == 0:
            raise ValueError(
                f"stop_sequences[{i}] must be a non-empty 1-D sequence of token ids, got shape "
                f"{tuple(t.shape)}"
            )
        out.append(check_tokens(f"stop_sequences[{i}]", t.long(), num_tokens=num_tokens, ndim=1))
    return out


def check_token_id(name: str, value: Any, num_tokens: int) -> int | None:
    """None, or a token id in [0, num_tokens)."""
    if value is None:
        return None
    return check_int(name, value, min=0, max=num_tokens - 1)
