"""Stateless batching: the batch at a step is a pure function of its arguments.

There is no sampler state to save or restore: resuming at step s, or splitting the global batch
across data-parallel ranks, gives exactly the examples a single uninterrupted process would see.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from demask._checks import check_int


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed mixed from (seed, step) with numpy's SeedSequence.

    Unlike `seed * K + step`, distinct pairs do not collide (e.g. seed 1 step 0 vs seed 0 step K).
    """
    state = np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def batch_indices(
    num_examples: int, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> Tensor:
    """(batch_size,) long indices of rank `rank`'s share of the global batch at `step`.

    The global batch is `batch_size * world_size` indices drawn uniformly with replacement by a
    torch.Generator seeded with `step_seed(seed, step)`; rank r takes rows [r*b, (r+1)*b).
    """
    check_int("num_examples", num_examples, min=1)
    check_int("step", step, min=0)
    check_int("batch_size", batch_size, min=1)
    check_int("seed", seed, min=0)
    check_int("world_size", world_size, min=1)
    check_int("rank", rank, min=0, max=world_size - 1)
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    idx = torch.randint(num_examples, (batch_size * world_size,), generator=gen)  # (b*w,)
    return idx[rank * batch_size : (rank + 1) * batch_size]


def get_batch(
    ds: Any, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> Tensor:
    """The (batch_size, seq_len) long batch of rank `rank` at training step `step`.

    ds: any dataset with `len(ds)` and `ds[i] -> (seq_len,)`; a `SequenceDataset` is gathered
    in one indexing operation. Two ranks with batch b each see exactly the rows that one process
    with batch 2b sees, and the batch at step s never depends on earlier calls.
    """
    idx = batch_indices(len(ds), step, batch_size, seed, rank, world_size)  # (b,)
    gather = getattr(ds, "gather", None)
    if gather is not None:
        return gather(idx)  # (b, seq_len)
    return torch.stack([torch.as_tensor(ds[int(i)]).long() for i in idx])  # (b, seq_len)
