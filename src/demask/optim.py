"""The training optimisers: AdamW, or Muon on the blocks' matrices with AdamW on the rest.

Muon (K. Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/; J. Liu et al. 2025,
"Muon is Scalable for LLM Training", arXiv 2502.16982) replaces each 2-D weight's update by the
nearest semi-orthogonal matrix to its Nesterov momentum, found by a few Newton-Schulz steps: every
direction of the matrix moves by the same amount, however skewed the gradient's spectrum is. Its
step is scaled by rms * sqrt(max(rows, cols)), so that its update's RMS is `rms` times the
learning rate: with the second paper's rms = 0.2, about AdamW's in a large model, both parts share
one learning rate and one weight decay.

`torch.optim.Muon` does the same, but always iterates in bfloat16, which a CPU without bfloat16
matrix units emulates about 16x slower than float32 (a 768 x 256 weight: 310 ms against 17 ms per
step, one thread). Here the iteration runs in bfloat16 on CUDA and in float32 elsewhere.

Which parameters go where (`param_groups`): Muon takes the weights of the `nn.Linear` layers inside
the transformer blocks (`AttentionLayers`); AdamW takes embeddings, the output layer, norms, biases
and every other parameter, with weight decay on `nn.Linear` matrices only, as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

from demask._checks import check_choice
from demask.model.attention_layers import AttentionLayers

__all__ = ["OPTIMIZERS", "Muon", "build_optimizer", "orthogonalize", "param_groups"]

# the quintic Newton-Schulz coefficients of Jordan et al.: the slope at 0 is as steep as five steps
# allow, so small singular values grow fast; the result's singular values land in about [0.7, 1.2]
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """About U V^T of the (m, n) matrix g = U S V^T: its singular values pushed towards 1 by
    `steps` quintic Newton-Schulz iterations, in bfloat16 on CUDA and float32 elsewhere."""
    if g.ndim != 2:
        raise ValueError(f"g must be a 2-D matrix, got shape {tuple(g.shape)}")
    a, b, c = _NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # iterate on the (small, small) Gram matrix
    x = x / x.norm().clamp(min=1e-7)  # Frobenius norm 1 bounds the spectral norm by 1
    for _ in range(steps):
        gram = x @ x.T  # (m, m), m = min(rows, cols)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon=True`, AdamW for the others, in one optimiser (so one
    state dict, one LR schedule and one `step()`).

    Group options: lr, weight_decay (decoupled: w *= 1 - lr * wd), muon; Muon groups also momentum,
    ns_steps and rms (the update's RMS over lr); AdamW groups betas and eps. Pass the groups of
    `param_groups`."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        ns_steps: int = 5,
        rms: float = 0.2,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"ns_steps must be an int >= 1, got {ns_steps!r}")
        if not rms > 0.0:
            raise ValueError(f"rms must be > 0, got {rms!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, betas=betas,
                        eps=eps, ns_steps=ns_steps, rms=rms, muon=False)  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if group["muon"] and p.ndim != 2]
            if bad:
                raise ValueError(f"Muon groups take 2-D weights only, got shapes {bad}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            update = orthogonalize(p.grad.add(buf, alpha=mu), group["ns_steps"])  # Nesterov
            p.mul_(1.0 - lr * wd)
            p.add_(update, alpha=-lr * group["rms"] * math.sqrt(max(p.shape)))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if params:
            beta1, beta2 = group["betas"]
            adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1,
                  beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                  eps=group["eps"], maximize=False)  # fmt: skip


def param_groups(
    model: nn.Module, weight_decay: float, *, muon: bool = False
) -> list[dict[str, Any]]:
    """The optimiser's groups. AdamW: `nn.Linear` weight matrices decay; everything else (biases,
    norms, embeddings, and a Linear weight tied to an embedding) does not. With `muon`, the
    Linear weights inside the transformer blocks form a third group, marked `muon=True`."""
    emb = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - emb
    blocks = {
        id(m.weight)
        for layers in model.modules()
        if isinstance(layers, AttentionLayers)
        for m in layers.modules()
        if isinstance(m, nn.Linear)
    } - emb
    groups: dict[str, list[nn.Parameter]] = {"muon": [], "decay": [], "rest": []}
    for p in model.parameters():  # each shared parameter once
        if p.requires_grad:
            key = "muon" if muon and id(p) in blocks else "decay" if id(p) in linear else "rest"
            groups[key].append(p)
    out = [
        {"params": groups["decay"], "weight_decay": weight_decay},
        {"params": groups["rest"], "weight_decay": 0.0},
    ]
    if muon:
        out.insert(0, {"params": groups["muon"], "weight_decay": weight_decay, "muon": True})
    return out


def _adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
           **muon: Any) -> torch.optim.Optimizer:  # fmt: skip
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas)


def _muon(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
          **muon: Any) -> torch.optim.Optimizer:  # fmt: skip
    return Muon(param_groups(model, weight_decay, muon=True), lr=lr, betas=betas, **muon)


# optimiser name -> builder (model, lr, weight_decay, AdamW betas, **Muon's own options)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "muon": _muon}


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.99),
    **muon: Any,
) -> torch.optim.Optimizer:
    """The optimiser `name` (a key of `OPTIMIZERS`) over `model`'s trainable parameters; `muon`
    (Muon's momentum, rms, ns_steps) is used by "muon" only."""
    check_choice("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[name](model, lr, weight_decay, betas, **muon)
