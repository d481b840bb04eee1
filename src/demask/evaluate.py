"""Likelihood on held-out data, in bits per token, for both model kinds.

- masked models: the NELBO (an upper bound on the negative log-likelihood) from the wrapper's
  `nelbo(x)`; MDLM, Sahoo et al. 2024, https://arxiv.org/abs/2406.07524. The wrapper draws its
  diffusion times; we run it under a forked RNG seeded per batch, so the number is deterministic.
- autoregressive models: the exact negative log-likelihood of tokens 1..N-1 given their prefix
  (token 0 has no prefix and is not scored), computed from the network's logits with a summed
  cross-entropy, so wrapper-side training extras (input masking, z-loss) never leak in.

Batches are fixed: global batch j holds examples [j*batch_size, (j+1)*batch_size) in dataset order
and rank r takes the batches j with j % world_size == r. Ranks sum bits and token counts and the
sums are all-reduced (not a mean of means), so the result does not depend on world_size.

The bits come from the model contract, `wrapper.likelihood_bits(x, num_times=...)`
(demask.wrappers.contract), run under a forked RNG seeded per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sized
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from demask._checks import check_int
from demask.modes import eval_mode


def _likelihood_bits(wrapper: Any) -> Any:
    fn = getattr(wrapper, "likelihood_bits", None)
    if not callable(fn):
        raise TypeError(
            "wrapper must have likelihood_bits (demask.wrappers.contract.ModelContract), got "
            f"{type(wrapper).__name__}"
        )
    return fn


def batch_bits(
    wrapper: nn.Module, x: Tensor, seed: int, num_times: int | None = None
) -> tuple[Tensor, int]:
    """(bits summed over the batch x (B, N), tokens scored), with the model's noise (a masked
    model's diffusion times and masks) drawn from the global RNG seeded by `seed` and restored
    after."""
    fn = _likelihood_bits(wrapper)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return fn(x, num_times=num_times)  # type: ignore[no-any-return]


def _stack(dataset: Any, start: int, stop: int) -> Tensor:
    gather = getattr(dataset, "gather", None)
    if gather is not None:
        return gather(torch.arange(start, stop))  # (B, N)
    return torch.stack([torch.as_tensor(dataset[i]).long() for i in range(start, stop)])


@torch.no_grad()
def likelihood_sums(
    wrapper: nn.Module,
    dataset: Any,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    seed: int = 0,
    num_times: int | None = None,
) -> tuple[float, int]:
    """(bits summed over all scored tokens, number of scored tokens), over all ranks."""
    check_int("batch_size", batch_size, min=1)
    check_int("world_size", world_size, min=1)
    check_int("rank", rank, min=0, max=world_size - 1)
    if max_batches is not None:
        check_int("max_batches", max_batches, min=1)
    if not isinstance(dataset, Sized) or len(dataset) == 0:
        raise ValueError("dataset must be a non-empty sequence of examples")
    _likelihood_bits(wrapper)  # TypeError now, not after loading a batch
    if num_times is not None:
        check_int("num_times", num_times, min=1)
    device = next(wrapper.parameters()).device  # the batches go where the model is
    n = len(dataset)
    num_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    bits = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(wrapper):
        for j in range(rank, num_batches, world_size):
            x = _stack(dataset, j * batch_size, min(n, (j + 1) * batch_size)).to(device)
            b, c = batch_bits(wrapper, x, seed * 1_000_003 + j, num_times)
            bits += b
            count += c
    sums = torch.stack([bits, torch.tensor(float(count), dtype=torch.float64, device=device)])
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return float(sums[0]), int(sums[1])


def likelihood_bits_per_token(
    wrapper: nn.Module,
    dataset: Any,
    batch_size: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    seed: int = 0,
    num_times: int | None = None,
) -> float:
    """Bits per token on `dataset`: NELBO for masked wrappers, exact NLL for autoregressive ones.

    dataset: a sequence of (N,) LongTensors (`demask.data.get_dataset(..., split="val")`).
    max_batches: evaluate only the first max_batches global batches (None = the whole dataset).
    rank, world_size: this process's share; the result is reduced over the process group.
    num_times: masked only: diffusion times of the NELBO per sequence (None: the wrapper's
    default; fewer is cheaper and coarser).
    Deterministic: the same inputs give the same number, for any world_size.
    """
    bits, count = likelihood_sums(
        wrapper, dataset, batch_size, max_batches, rank, world_size,
        seed=seed, num_times=num_times,
    )  # fmt: skip
    return bits / count


@torch.no_grad()
def masked_cross_entropy_bits(
    net: nn.Module,
    x: Tensor,
    count: int,
    mask_id: int,
    generator: torch.Generator | None = None,
    draws: int = 1,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy (bits) of the masked tokens when exactly `count` positions of every row
    of x (B, N) are replaced by `mask_id`, the positions drawn uniformly without replacement
    (`draws` independent draws per row).

    With few masked positions this shows whether a masked model uses its context: one that
    ignores it scores its unigram entropy. net: tokens (B, N) -> logits (B, N, V), run in
    eval mode.
    """
    if not isinstance(x, Tensor) or x.ndim != 2 or x.dtype != torch.long:
        raise TypeError(f"x must be a (B, N) long tensor, got {x!r:.80}")
    check_int("count", count, min=1, max=x.shape[1])
    check_int("draws", draws, min=1)
    check_int("batch_size", batch_size, min=1)
    total, scored = 0.0, 0
    with eval_mode(net):
        for _ in range(draws):
            ranks = torch.rand(x.shape, generator=generator).argsort(-1).argsort(-1)
            mask = (ranks < count).to(x.device)
            for i in range(0, len(x), batch_size):
                rows, where = x[i : i + batch_size], mask[i : i + batch_size]
                logits = net(rows.masked_fill(where, mask_id))  # (b, N, V)
                ce = nn.functional.cross_entropy(
                    logits[where].float(), rows[where], reduction="sum"
                )
                total += float(ce)
                scored += int(where.sum())
    return total / scored / math.log(2)
