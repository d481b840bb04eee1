"""The model contract (demask.wrappers.contract) of `NonAutoregressiveWrapper`: loss, NELBO bits,
sampling with `SampleOptions`, and building from a `ModelConfig`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from demask.wrappers.contract import ModelContract, SampleOptions, Samples


class MaskedContract(ModelContract):
    """Mixin of NonAutoregressiveWrapper (which provides forward, nelbo, generate, mask_id)."""

    kind = "masked"
    likelihood_name = "nelbo"  # MDLM negative ELBO: an upper bound on the NLL
    sample_options = frozenset(
        {"seed", "temperature", "filter_thres", "prompt", "sampler", "decode_steps", "anneal",
         "guidance", "allowed_tokens", "history"}
    )  # fmt: skip
    default_sampler = "ancestral"  # `sample`'s: MDLM ancestral sampling (generate's is the seed's)
    mask_id: int
    max_seq_len: int
    net: Any
    nelbo: Any
    generate: Any

    def loss(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """`forward`'s loss and its parts as metrics (generator_loss, critic_loss)."""
        out = self(x, **kwargs)
        metrics = {"generator_loss": out.generator_loss.detach()}
        if out.critic_loss is not None:
            metrics["critic_loss"] = out.critic_loss.detach()
        return out.loss, metrics

    def likelihood_bits(self, x: Tensor, *, num_times: int | None = None) -> tuple[Tensor, int]:
        """NELBO bits of x (B, N) summed as bits per token times N per row (`nelbo`)."""
        bits = self.nelbo(x, **({} if num_times is None else {"num_times": num_times}))  # (B,)
        return (bits.sum() * x.shape[1]).double(), x.numel()

    def sample(self, n: int, options: SampleOptions) -> Samples:
        """Iterative demasking (`generate`) of n sequences; `options.prompt` holes (None) and the
        positions after it are filled. Defaults: MDLM ancestral sampling at a constant
        temperature without logits filtering (Sahoo et al. 2024), i.e. the model's own
        distribution; the seed's MaskGIT decoding is sampler "confidence", filter_thres 0.7,
        anneal."""
        self.check_sample_options(options)
        dev = next(self.net.parameters()).device
        settings = {
            "sampler": options.sampler or self.default_sampler,
            "filter_thres": options.filter_thres,
            "anneal": options.anneal,
        }
        kwargs: dict[str, Any] = {"steps": options.decode_steps}
        if options.prompt is not None:
            kwargs["prompt"] = self._prompt_tokens(options.prompt, n).to(dev)
        tokens, history = self.generate(
            batch_size=n,
            start_temperature=options.temperature,
            filter_thres=options.filter_thres,
            sampler=settings["sampler"],
            anneal_temperature=options.anneal,
            allowed_tokens=options.allowed_tokens,
            generator=torch.Generator(dev).manual_seed(options.seed),
            return_history=True,
            guidance_scale=options.guidance,
            **kwargs,
        )
        return Samples(tokens.cpu(), history.cpu() if options.history else None, settings)

    def _prompt_tokens(self, prompt: tuple[int | None, ...], n: int) -> Tensor:
        """(n, max_seq_len): the prompt with its holes (None) and the rest as mask tokens."""
        length = self.max_seq_len
        if len(prompt) > length:
            raise ValueError(
                f"prompt: {len(prompt)} tokens, longer than the model's sequence length {length}"
            )
        ids = [self.mask_id if t is None else t for t in prompt]
        ids += [self.mask_id] * (length - len(prompt))
        return torch.tensor(ids, dtype=torch.long).expand(n, length).clone()

    @classmethod
    def from_config(cls, config: Any) -> MaskedContract:
        """An Encoder backbone with the data's tokens plus the mask token, and the wrapper."""
        from demask.model import Encoder

        mask_id = config.num_tokens if config.mask_id is None else config.mask_id
        num_tokens = max(config.num_tokens, mask_id) + 1  # the data's tokens and the mask token
        net = config.backbone(Encoder, num_tokens=num_tokens)
        critic = None
        if config.token_critic:  # a second backbone of the same shape, one logit per token
            critic = config.backbone(Encoder, num_tokens=num_tokens, logits_dim=1)
        return cls(net, **config.arguments(cls, mask_id=mask_id, token_critic=critic))
