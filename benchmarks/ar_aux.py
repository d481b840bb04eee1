"""A harness-only probe (issue 11): the masked model also trained as a left-to-right one.

A masked model is scored only where it masked a token: about half the positions of a row, many
of them at mask rates where the context says little. An autoregressive model is scored at every
position, from a context that is all real. This probe gives the first `ar_rows` rows of each
training batch to that second task, on the same weights: the net runs causally (every block's
attention sees only earlier keys, and the token shift reads only earlier neighbours) on the clean
row, and its logits at position i are scored against the byte at i + 1. The other rows train the
masked objective as before; the loss is the masked loss plus `weight` times the mean next-byte
cross-entropy. The two tasks never share an input kind: a masked row is scored only where it
shows the mask token, a causal row only where it shows a real byte. The scored model is the
masked one (bidirectional, the NELBO), unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demask.model import layers

_SHIFT = layers.shift_tokens  # the library's token shift, restored after every causal pass


def _past_shift(h: Tensor, reach: int, key_mask: Tensor | None = None) -> Tensor:
    """`layers.shift_tokens` with the parts read from later positions zeroed."""
    out = _SHIFT(h, reach, key_mask)
    parts = out.tensor_split(2 * reach + 1, dim=-1)
    return torch.cat([p if j <= reach else torch.zeros_like(p) for j, p in enumerate(parts)], -1)


@contextmanager
def causal(net: nn.Module) -> Iterator[None]:
    """Within the block, `net` (a demask TransformerWrapper of an Encoder) runs left to right."""
    blocks = list(net.attn_layers.blocks)  # type: ignore[union-attr, arg-type]
    saved = [b.attn.causal for b in blocks]
    for b in blocks:
        b.attn.causal = True
    layers.shift_tokens = _past_shift  # type: ignore[assignment]
    try:
        yield
    finally:
        layers.shift_tokens = _SHIFT  # type: ignore[assignment]
        for b, c in zip(blocks, saved):
            b.attn.causal = c


def next_byte_loss(net: nn.Module, x: Tensor) -> Tensor:
    """Mean cross-entropy of x[:, 1:] from the causal pass over x (nats)."""
    with causal(net):
        logits = net(x)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())


def install(model: nn.Module, ar_rows: int, weight: float) -> None:
    """`model`'s training forward (a demask NonAutoregressiveWrapper) becomes the hybrid loss."""
    forward = model.forward

    def hybrid(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not model.training:
            return forward(x, *args, **kwargs)
        masked = forward(x[ar_rows:], *args, **kwargs).loss
        return masked + weight * next_byte_loss(model.net, x[:ar_rows])  # type: ignore[arg-type]

    model.forward = hybrid  # type: ignore[method-assign]


# name -> (rows of each batch trained left to right, the weight of their loss)
VARIANTS: dict[str, tuple[int, float]] = {
    "ar_aux_2": (2, 1.0),
    "ar_aux_4": (4, 1.0),
}
