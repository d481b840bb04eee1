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

A new wrapper class is supported by `register_likelihood(cls, fn)`, fn(wrapper, x, seed,
**options) -> (bits summed over the batch, number of tokens scored); options: num_times.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sized
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from demask._checks import check_int
from demask.modes import eval_mode

LikelihoodFn = Callable[..., tuple[Tensor, int]]  # fn(wrapper, x, seed, **options)
LIKELIHOODS: dict[type, LikelihoodFn] = {}
_LN2 = math.log(2.0)


def register_likelihood(cls: type, fn: LikelihoodFn) -> LikelihoodFn:
    """Use `fn` for wrappers of class `cls` (and its subclasses)."""
    LIKELIHOODS[cls] = fn
    return fn


def masked_bits(
    wrapper: nn.Module, x: Tensor, seed: int, num_times: int | None = None
) -> tuple[Tensor, int]:
    """NELBO bits summed over the batch x (B, N), with the wrapper's noise seeded by `seed`.
    num_times: diffusion times per sequence (None: the wrapper's default)."""
    kwargs = {} if num_times is None else {"num_times": num_times}
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        bits = wrapper.nelbo(x, **kwargs)  # type: ignore[operator]  # bits per token: a scalar (batch mean) or (B,) per sequence
    total = bits * x.numel() if bits.ndim == 0 else bits.sum() * x.shape[1]
    return total.double(), x.numel()


def autoregressive_bits(wrapper: nn.Module, x: Tensor, seed: int, **_: Any) -> tuple[Tensor, int]:
    """Exact NLL bits of x[:, 1:] given the prefix, summed over the batch x (B, N)."""
    logits = wrapper.net(x[:, :-1])  # type: ignore[operator]  # (B, N-1, V)
    nats = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
    )
    return nats.double() / _LN2, x[:, 1:].numel()


_DEFAULTS: dict[str, LikelihoodFn] = {
    "NonAutoregressiveWrapper": masked_bits,
    "AutoregressiveWrapper": autoregressive_bits,
}


def _default_registry() -> None:
    import demask.wrappers as wrappers

    for name, fn in _DEFAULTS.items():
        cls = getattr(wrappers, name, None)
        if cls is not None:
            LIKELIHOODS.setdefault(cls, fn)


def _likelihood_fn(wrapper: nn.Module) -> LikelihoodFn:
    with contextlib.suppress(ImportError):  # wrappers are optional for registered stand-ins
        _default_registry()
    for cls in type(wrapper).__mro__:
        if cls in LIKELIHOODS:
            return LIKELIHOODS[cls]
    known = sorted(c.__name__ for c in LIKELIHOODS)
    raise TypeError(
        f"wrapper must be one of {known} (see register_likelihood), got {type(wrapper).__name__}"
    )


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
    device: torch.device | str | None = None,
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
    fn = _likelihood_fn(wrapper)
    options = {} if num_times is None else {"num_times": check_int("num_times", num_times, min=1)}
    if device is None:
        device = next(wrapper.parameters()).device
    n = len(dataset)
    num_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    bits = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(wrapper):
        for j in range(rank, num_batches, world_size):
            x = _stack(dataset, j * batch_size, min(n, (j + 1) * batch_size)).to(device)
            b, c = fn(wrapper, x, seed * 1_000_003 + j, **options)
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
    device: torch.device | str | None = None,
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
        seed=seed, device=device, num_times=num_times,
    )  # fmt: skip
    return bits / count
