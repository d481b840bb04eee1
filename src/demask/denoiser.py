"""What masked training and masked decoding both call: self-conditioning and the token critic.

Training (demask.wrappers.nonautoregressive) and the decoding loop (demask.decoding.masked) use
the same functions here, so that the two cannot drift apart: the self-conditioning projection
feeds a previous pass's embeddings back through the net's `sum_embeds`, and the critic scores
"this token is wrong" either with its own network or with a head on the net's embeddings.

`Denoiser` bundles them for the decoding loop, with classifier-free guidance and a count of the
network's forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from demask.samplers import Logits, MaskedState

__all__ = ["Denoiser", "Guidance", "critic_logits", "self_cond_embeds"]


def self_cond_embeds(to_self_cond: nn.Module | None, previous: Tensor | None) -> Tensor | None:
    """The `sum_embeds` (B, N, emb_dim) of a self-conditioned pass, or None (no previous pass)."""
    if to_self_cond is None or previous is None:
        return None
    return to_self_cond(previous)


def critic_logits(
    seq: Tensor,
    net: nn.Module,
    token_critic: nn.Module | None,
    critic_head: nn.Module | None,
    **kwargs: Any,
) -> Tensor:
    """(B, N) critic logits of `seq` (B, N): token_critic's own network, else a head on net."""
    if token_critic is not None:
        return token_critic(seq, **kwargs).squeeze(-1)
    if critic_head is None:
        raise ValueError("critic_logits needs a token_critic or a critic_head")
    return critic_head(net(seq, return_embeddings=True, **kwargs)).squeeze(-1)


@dataclass
class Guidance:
    """Classifier-free guidance for masked decoding (Ho & Salimans 2022, arXiv 2207.12598; for
    masked diffusion: Schiff et al. 2024, arXiv 2412.10193, and LLaDA, arXiv 2502.09992).

    Each step the network is called twice: on the state (conditional logits c) and on the state
    with the condition's positions masked (unconditional logits u); the step samples from
    u + scale * (c - u). scale 0 is unconditional sampling, 1 conditional, > 1 strengthens the
    condition. Mixing logits or log-probabilities gives the same distribution (they differ by a
    constant per position).
    """

    scale: float
    drop: Tensor  # (B, N) bool: the condition's positions, masked for the unconditional call


class Denoiser:
    """The decoding loop's view of the network: logits at candidate positions, and the critic.

    net: a TransformerWrapper-like module (`return_embeddings`, `sum_embeds`, an output head);
    to_self_cond: the self-conditioning projection (Linear dim -> emb_dim) or None;
    token_critic / critic_head: as in `critic_logits`; net_kwargs go to every call of the net.
    `forwards` counts the forward passes of the net and the critic network.
    """

    def __init__(
        self,
        net: nn.Module,
        to_self_cond: nn.Module | None = None,
        token_critic: nn.Module | None = None,
        critic_head: nn.Module | None = None,
        net_kwargs: dict[str, Any] | None = None,
        guidance: Guidance | None = None,
    ) -> None:
        self.net, self.to_self_cond = net, to_self_cond
        self.token_critic, self.critic_head = token_critic, critic_head
        self.kwargs = net_kwargs or {}
        self.guidance = guidance
        self.prev_emb: list[Tensor | None] = [None, None]  # (B, N, dim) per branch (cond, uncond)
        self.forwards = 0
        self.logit_bias: Tensor | None = None  # (V,) added to every logit (an EOS penalty)

    @property
    def has_critic(self) -> bool:
        return self.token_critic is not None or self.critic_head is not None

    def hidden(self, seq: Tensor, branch: int = 0) -> Tensor:
        """(B, N, dim) embeddings of seq, self-conditioned on this branch's previous pass."""
        sum_embeds = self_cond_embeds(self.to_self_cond, self.prev_emb[branch])
        emb = self.net(seq, return_embeddings=True, sum_embeds=sum_embeds, **self.kwargs)
        self.forwards += 1
        if self.to_self_cond is not None:
            self.prev_emb[branch] = emb
        return emb

    def head(self, emb: Tensor) -> Tensor:
        net: Any = self.net  # a TransformerWrapper, or a stand-in with a `to_logits` head
        to_logits = getattr(net, "logits_from_embeddings", None) or net.to_logits
        return to_logits(emb)

    def logits(self, state: MaskedState, candidates: Tensor) -> Logits:
        """The (M, V) float logits at the candidates (B, N) bool of state, guided when asked."""
        rows, cols = candidates.nonzero(as_tuple=True)  # (M,)
        seq = state.tokens
        values = self.head(self.hidden(seq)[rows, cols]).float()  # the head only where needed
        if self.guidance is not None:
            uncond_seq = seq.masked_fill(self.guidance.drop, state.mask_id)
            uncond = self.head(self.hidden(uncond_seq, branch=1)[rows, cols]).float()
            values = uncond + self.guidance.scale * (values - uncond)
        if self.logit_bias is not None:
            values = values + self.logit_bias
        return Logits(rows, cols, values)

    def critic(self, seq: Tensor) -> Tensor:
        """(B, N) critic scores of a filled canvas, higher = more likely wrong."""
        self.forwards += 1
        return critic_logits(seq, self.net, self.token_critic, self.critic_head, **self.kwargs)
