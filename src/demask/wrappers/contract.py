"""The methods every model kind answers, so the trainer, the evaluator and the CLI never ask which
kind they hold:

    model = Wrapper.from_config(model_config)   # build from a demask.config.ModelConfig
    loss, metrics = model.loss(x)                # training loss (scalar) and detached metrics
    bits, count = model.likelihood_bits(x)       # bits summed over the batch, tokens scored
    model.bits_per_token(x)                      # bits / count
    samples = model.sample(n, SampleOptions(...))  # -> Samples(tokens (n, N), history or None)
    model.likelihood_name                        # what the bits measure ("nelbo", "exact_nll")

`SampleOptions` holds the sampling settings of both kinds; a kind refuses the settings it does not
use (`check_sample_options`), naming the kind the setting is for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["SAMPLE_OPTION_NAMES", "ModelContract", "SampleOptions", "Samples"]


def _for(models: str) -> dict[str, str]:
    return {"models": models}


@dataclass(frozen=True)
class SampleOptions:
    """How to sample. Fields with a `models` entry in their metadata apply to that kind only
    (`SAMPLE_OPTION_MODELS`); a model refuses those it does not use."""

    seed: int = 0  # seeds the sampling generator (on the model's device)
    temperature: float = 1.0  # 0 = greedy
    filter_thres: float = 0.0  # keep the top ceil((1 - F) * vocab) logits; 0 = no filtering
    prompt: tuple[int | None, ...] | None = None  # token ids; None marks a hole (masked models)
    start: Tensor | None = field(default=None, metadata=_for("autoregressive"))  # (n, k) first
    # tokens to continue when there is no prompt
    length: int | None = field(default=None, metadata=_for("autoregressive"))  # new tokens
    sampler: str | None = field(default=None, metadata=_for("masked"))  # None: ancestral
    decode_steps: int | None = field(default=None, metadata=_for("masked"))  # None: the model's
    anneal: bool = field(default=False, metadata=_for("masked"))  # temperature -> 0 over steps
    guidance: float | None = field(default=None, metadata=_for("masked"))  # CFG scale
    allowed_tokens: Tensor | None = field(
        default=None, metadata=_for("masked")
    )  # (V,) or (N, V) bool: the tokens every position (or each) may be given
    history: bool = False  # keep every step's state (masked; an AR model returns None)

    def given(self) -> dict[str, Any]:
        """{field: value} of the settings that differ from the defaults."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not f.default and (isinstance(value, Tensor) or value != f.default):
                out[f.name] = value
        return out


@dataclass
class Samples:
    """Generated tokens (n, N); for masked models with `history`, the state after each step
    (steps, n, N); `settings`: the sampling settings used (defaults resolved), for the record."""

    tokens: Tensor
    history: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def prefix_of(n: int, options: SampleOptions) -> Tensor:
    """(n, k) the prefix a left-to-right model continues: `options.prompt` (token ids, no holes)
    repeated n times, or `options.start`."""
    prompt = options.prompt
    if prompt is None:
        if options.start is None:
            raise ValueError("prompt: an autoregressive model needs a prompt or start tokens")
        return options.start
    if any(t is None for t in prompt):
        raise ValueError(
            "prompt: holes need a masked model; an autoregressive model only continues a prefix"
        )
    if not prompt:
        raise ValueError("prompt: an autoregressive model needs at least one prompt token")
    return torch.tensor(prompt, dtype=torch.long).expand(n, len(prompt)).clone()


class ModelContract(nn.Module):
    """Base of the wrappers: the methods the trainer, the evaluator and the CLI call."""

    kind: ClassVar[str]  # the name under which demask.config registers the wrapper
    likelihood_name: ClassVar[str]  # what `likelihood_bits` measures
    sample_options: ClassVar[frozenset[str]]  # the SampleOptions fields this kind uses

    @classmethod
    def from_config(cls, config: Any) -> ModelContract:
        """The wrapper and its backbone for a demask.config.ModelConfig (fresh weights)."""
        raise NotImplementedError

    def loss(self, x: Tensor, **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss of tokens x (B, N), a scalar, and detached metrics."""
        raise NotImplementedError

    def likelihood_bits(self, x: Tensor, *, num_times: int | None = None) -> tuple[Tensor, int]:
        """(bits summed over the batch x (B, N) as a float64 scalar, number of tokens scored).
        num_times: masked models' NELBO diffusion times (None: the model's default)."""
        raise NotImplementedError

    def bits_per_token(self, x: Tensor, *, num_times: int | None = None) -> float:
        """Bits per scored token of the batch x (B, N)."""
        bits, count = self.likelihood_bits(x, num_times=num_times)
        return float(bits) / count

    def sample(self, n: int, options: SampleOptions) -> Samples:
        """n samples as `options` ask."""
        raise NotImplementedError

    def check_sample_options(self, options: SampleOptions) -> None:
        """ValueError naming the first given setting that this kind does not use."""
        for name in options.given():
            if name not in self.sample_options:
                models = SAMPLE_OPTION_MODELS.get(name, "other")
                raise ValueError(
                    f"{name}: applies to {models} models only, but this model is {self.kind!r}"
                )


SAMPLE_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(SampleOptions))
# SampleOptions field -> the kind of model it is for (fields for every kind are absent)
SAMPLE_OPTION_MODELS = {
    f.name: f.metadata["models"] for f in dataclasses.fields(SampleOptions) if f.metadata
}
