"""NonAutoregressiveWrapper: masked training (MDLM / MaskGIT) and iterative demasking.

A thin facade over demask.schedules, demask.objectives.masked, demask.samplers and the one
decoding loop demask.decoding.masked, with the seed's constructor, forward and generate.
The seed speaks of progress p (its `schedule` gives the mask ratio at progress p); inside, diffusion
time t = 1 - p is used (t = 0 clean, t = 1 fully masked), converted here (a callable through
`CallableSchedule(fn, progress=True)`, which also checks it) and nowhere else.
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from demask._checks import check_choice, check_float, check_int, check_tokens
from demask.decoding.blocks import demask_blocks
from demask.decoding.masked import demask
from demask.denoiser import critic_logits, self_cond_embeds
from demask.model import TransformerWrapper
from demask.modes import eval_mode
from demask.objectives.masked import TRAIN_MASKINGS, MaskedObjective, check_predict_dropped_cond
from demask.samplers import MaskedSampler, RevealRule, get_rule, sample_categorical
from demask.schedules import SCHEDULES, CallableSchedule, Schedule, get_schedule
from demask.wrappers.masked_contract import MaskedContract
from demask.wrappers.masked_generation import (
    block_options,
    denoiser,
    draw_condition,
    initial_state,
    output,
    start_canvas,
)

__all__ = ["Losses", "NonAutoregressiveWrapper"]

Losses = namedtuple("Losses", ["loss", "generator_loss", "critic_loss"])


def _schedule_from_seed(schedule: str | Callable) -> Schedule:
    """The seed's `schedule` ('linear', 'cosine', or a callable of progress p) as a Schedule."""
    if isinstance(schedule, str):
        return get_schedule(check_choice("schedule", schedule, SCHEDULES))
    if not callable(schedule):
        raise ValueError(f"schedule must be 'linear', 'cosine' or a callable, got {schedule!r}")
    return CallableSchedule(schedule, progress=True)  # mask_ratio(t) = seed_fn(1 - t), checked


class NonAutoregressiveWrapper(MaskedContract):
    """Wraps a bidirectional `TransformerWrapper` for masked training and generation.

    Args (the seed's):
      net: the backbone, num_tokens including `mask_id`; sequences have length net.max_seq_len.
      mask_id: the mask token, an id of net's embedding table.
      steps: demasking steps of `generate`.
      self_cond: feed the previous pass's embeddings back (a Linear dim -> emb_dim into
        sum_embeds, started at zero); in training a no-grad first pass with probability
        `self_cond_train_prob`.
      no_replace_prob, random_token_prob: BERT augmentation of the masked inputs.
      schedule: 'linear' (mask ratio 1 - p), 'cosine' (cos(pi p / 2)) or a callable of progress p.
      can_mask_prev_unmasked: whether `generate` may mask a revealed token again.
      token_critic: a TransformerWrapper with logits_dim=1 scoring "this token is wrong"
        (Lezama et al. 2022, https://arxiv.org/abs/2209.04439); self_token_critic: a Linear(dim, 1)
        head on the net's own embeddings instead. critic_loss_weight weighs its binary loss.
      use_simple_mdlm_loss_weight: the MDLM loss (Sahoo et al. 2024,
        https://arxiv.org/abs/2406.07524), an unbiased NELBO estimate in nats per token when the
        augmentation is off; False: MaskGIT's mean cross-entropy over masked positions.

    demask's own:
      cond_drop_prob, cond_prefix_len: classifier-free guidance's condition dropout, and the
        leading positions that are a condition (see `forward`).
      predict_dropped_cond: a dropped condition is masked and predicted like the rest, and every
        row's alone with the rest hidden; `generate` draws a condition left masked, then the rest.
      train_masking: how mean-CE training (use_simple_mdlm_loss_weight=False) masks. "schedule"
        (default): a time and Bernoulli masks, the seed's. "bell": an exact count per row, mostly
        half-masked rows (`demask.objectives.masked.bell_mass`), the mean of the rows' mean CE;
        part of the best masked recipe at the quality benchmark's budget (benchmarks/RESULTS.md,
        "The ablation's three modules in the library").
    """

    # How the MDLM loss (use_simple_mdlm_loss_weight=True) is estimated in training. "count": an
    # exact number of masked tokens per row (drawn as `mdlm_count_power` says) and the row's mean
    # cross-entropy, importance-weighted (`objectives.masked.count_masks`); "time": a time t from the schedule, Bernoulli(m(t)) masks
    # and the weight m'(t)/m(t). Both are unbiased estimates of the same NELBO (the NELBO does not
    # depend on the schedule); "count" has far less variance (benchmarks/RESULTS.md, "ablation").
    mdlm_estimator: str = "count"
    # "count": mask counts k drawn from q(k) ~ k^-power with importance weights 1 / (L q(k)) (0:
    # uniform k). 0.5 minimises the gradient variance when tokens are equally noisy, and trained
    # 2.7% better than uniform k in the ablation (3 seeds).
    mdlm_count_power: float = 0.5

    def __init__(  # noqa: PLR0913  (the seed's signature)
        self,
        net: TransformerWrapper,
        *,
        mask_id: int,
        steps: int = 18,
        self_cond: bool = False,
        self_cond_train_prob: float = 0.75,
        no_replace_prob: float = 0.15,
        random_token_prob: float = 0.1,
        schedule: str | Callable = "linear",
        can_mask_prev_unmasked: bool = False,
        token_critic: nn.Module | None = None,
        self_token_critic: bool = False,
        critic_loss_weight: float = 1.0,
        use_simple_mdlm_loss_weight: bool = True,
        cond_drop_prob: float = 0.0,
        cond_prefix_len: int = 0,
        train_masking: str = "schedule",
        predict_dropped_cond: bool = False,
    ):
        super().__init__()
        self.net = net
        self.num_tokens: int = net.num_tokens
        self.max_seq_len: int = net.max_seq_len
        self.mask_id = check_int("mask_id", mask_id, min=0, max=self.num_tokens - 1)
        check_int("net.num_tokens", self.num_tokens, min=2)  # mask_id and a token to generate
        self.steps = check_int("steps", steps, min=1)
        self.self_cond_train_prob = check_float(
            "self_cond_train_prob", self_cond_train_prob, min=0.0, max=1.0
        )
        self.no_replace_prob = check_float("no_replace_prob", no_replace_prob, min=0.0, max=1.0)
        self.random_token_prob = check_float(
            "random_token_prob", random_token_prob, min=0.0, max=1.0
        )
        if no_replace_prob + random_token_prob > 1:
            raise ValueError(
                "no_replace_prob + random_token_prob must be <= 1, got "
                f"{no_replace_prob} + {random_token_prob}"
            )
        self.schedule = _schedule_from_seed(schedule)
        self.can_mask_prev_unmasked = bool(can_mask_prev_unmasked)
        self.use_simple_mdlm_loss_weight = bool(use_simple_mdlm_loss_weight)
        self.critic_loss_weight = check_float("critic_loss_weight", critic_loss_weight, min=0.0)
        self.cond_drop_prob = check_float("cond_drop_prob", cond_drop_prob, min=0.0, max=1.0)
        self.cond_prefix_len = check_int(
            "cond_prefix_len", cond_prefix_len, min=0, max=self.max_seq_len - 1
        )
        self.train_masking = check_choice("train_masking", train_masking, TRAIN_MASKINGS)
        self.predict_dropped_cond = check_predict_dropped_cond(
            predict_dropped_cond, self.cond_drop_prob, self.cond_prefix_len
        )
        if self.train_masking != "schedule" and self.use_simple_mdlm_loss_weight:
            raise ValueError(
                f"train_masking={train_masking!r} is for mean-CE training "
                "(use_simple_mdlm_loss_weight=False); the MDLM loss draws its own mask counts"
            )
        if token_critic is not None and self_token_critic:
            raise ValueError("pass either token_critic or self_token_critic=True, not both")

        dim, emb_dim = net.attn_layers.dim, net.emb_dim
        self.self_cond = bool(self_cond)
        self.to_self_cond = nn.Linear(dim, emb_dim, bias=False) if self_cond else None
        if self.to_self_cond is not None:  # starts as the plain model; learns to use the feedback
            nn.init.zeros_(self.to_self_cond.weight)
        self.token_critic = token_critic
        self.to_critic_logits = nn.Linear(dim, 1) if self_token_critic else None

    @property
    def has_critic(self) -> bool:
        return self.token_critic is not None or self.to_critic_logits is not None

    # ------------------------------------------------------------------ training
    def _embed(self, inp: Tensor, self_condition: bool, **kwargs: Any) -> Tensor:
        """(B, N, dim) embeddings, with a no-grad first pass when self-conditioning."""
        first = None
        if self_condition and self.to_self_cond is not None:
            with torch.no_grad():
                first = self.net(inp, return_embeddings=True, **kwargs).detach()
        sum_embeds = self_cond_embeds(self.to_self_cond, first)
        return self.net(inp, return_embeddings=True, sum_embeds=sum_embeds, **kwargs)

    def _masked_ce(self, x: Tensor, inp: Tensor, mask: Tensor, self_condition: bool, **kwargs):
        emb = self._embed(inp, self_condition, **kwargs)  # (B, N, dim)
        rows, cols = mask.nonzero(as_tuple=True)  # (M,)
        logits = self.net.logits_from_embeddings(emb[rows, cols])  # (M, V) masked positions only
        ce = F.cross_entropy(logits.float(), x[rows, cols], reduction="none")  # (M,) nats
        return ce, logits, rows, cols

    def _condition(self, condition: Tensor | None, b: int, n: int, device: Any) -> Tensor:
        """(B, N) bool: the given (condition) positions of a batch."""
        if condition is None:
            return (torch.arange(n, device=device) < self.cond_prefix_len).expand(b, n)
        if not isinstance(condition, Tensor) or condition.dtype != torch.bool:
            raise TypeError(f"condition must be a bool tensor, got {condition!r:.80}")
        if condition.shape not in ((n,), (b, n)):
            raise ValueError(
                f"condition must have shape ({n},) or ({b}, {n}), got {tuple(condition.shape)}"
            )
        return condition.to(device).expand(b, n)

    def _check_x(self, x: Any) -> Tensor:
        n, mask_id = self.max_seq_len, self.mask_id
        return check_tokens("x", x, num_tokens=self.num_tokens, ndim=2, seq_len=n,
                            forbidden=mask_id, nonempty=True)  # fmt: skip

    def forward(
        self,
        x: Tensor,
        only_train_generator: bool = False,
        only_train_critic: bool = False,
        generator_sample_temperature: float | None = None,
        condition: Tensor | None = None,
        **kwargs: Any,
    ) -> Losses:
        """x: (B, max_seq_len) clean tokens -> Losses(loss, generator_loss, critic_loss).

        condition: (N,) or (B, N) bool, positions of x that are given (a class token, a prompt):
        never masked and not in the loss; dropped to mask tokens with probability
        cond_drop_prob per row. Default: the first cond_prefix_len positions.
        """
        x = self._check_x(x)
        if only_train_generator and only_train_critic:
            raise ValueError("only_train_generator and only_train_critic cannot both be True")
        b, n = x.shape
        cond = self._condition(condition, b, n, x.device)  # (B, N) bool

        def predict(inp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            self_condition = self.self_cond and float(torch.rand(())) < self.self_cond_train_prob
            return self._masked_ce(x, inp, mask, self_condition, **kwargs)

        with torch.set_grad_enabled(torch.is_grad_enabled() and not only_train_critic):
            generator_loss, logits, rows, cols = self._objective()(x, cond, predict)
        if not self.has_critic or only_train_generator:
            return Losses(generator_loss, generator_loss, None)
        critic_loss = self._critic_loss(x, logits, rows, cols, generator_sample_temperature, kwargs)
        if only_train_critic:
            return Losses(critic_loss, generator_loss, critic_loss)
        loss = generator_loss + self.critic_loss_weight * critic_loss
        return Losses(loss, generator_loss, critic_loss)

    def _objective(self) -> MaskedObjective:
        return MaskedObjective(
            self.schedule, self.mask_id, self.num_tokens, self.no_replace_prob,
            self.random_token_prob, self.cond_drop_prob, self.use_simple_mdlm_loss_weight,
            self.mdlm_estimator, self.mdlm_count_power, self.train_masking,
            self.predict_dropped_cond,
        )  # fmt: skip

    def _critic_loss(
        self, x: Tensor, logits: Tensor, rows: Tensor, cols: Tensor, temperature: Any, kwargs: Any
    ) -> Tensor:
        """The critic learns which sampled tokens differ from the truth (Lezama et al. 2022)."""
        if temperature is None:
            temperature = float(torch.rand(()))
        sample_logits = logits.detach().float()
        sample_logits[:, self.mask_id] = -math.inf
        generated = x.clone()
        generated[rows, cols] = sample_categorical(sample_logits, temperature)
        target = (generated != x).float()  # (B, N)
        scores = critic_logits(
            generated, self.net, self.token_critic, self.to_critic_logits, **kwargs
        )  # (B, N)
        return F.binary_cross_entropy_with_logits(scores.float(), target)

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nelbo(
        self,
        x: Tensor,
        num_times: int = 32,
        discrete_steps: int | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "none",
        condition: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """The MDLM negative ELBO of `x` (B, max_seq_len) in bits per token: (B,) or the mean.

        With a condition (`cond_prefix_len`, or `condition` as in `forward`), the bound is that of
        the other tokens given the condition, per token of those.

        Continuous time (default): the times t_j = (j + 0.5) / num_times, one Bernoulli(m(t_j))
        mask draw each, weight m'(t)/m(t). `discrete_steps=T`: the T-step discrete-time bound,
        every t_i = i / T once with weight (m(t_i) - m(t_{i-1})) / m(t_i) (num_times is unused).
        Augmentation is off; with self-conditioning a first pass feeds the second.
        """
        x = self._check_x(x)
        check_choice("reduction", reduction, ("none", "mean"))
        b, n = x.shape
        cond = self._condition(condition, b, n, x.device)  # (B, N)

        def predict(inp: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            return self._masked_ce(x, inp, mask, self.self_cond, **kwargs)

        with eval_mode(self):
            bits = self._objective().nelbo(x, cond, predict, num_times, discrete_steps, generator)
        return bits.mean() if reduction == "mean" else bits

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(  # noqa: PLR0913  (the seed's signature, and its documented options)
        self,
        batch_size: int | None = None,
        start_temperature: float = 1.0,
        filter_thres: float = 0.7,
        noise_level_scale: float = 1.0,
        *,
        prompt: Tensor | None = None,
        seq_len: int | None = None,
        steps: int | None = None,
        sampler: str | RevealRule | MaskedSampler = "confidence",
        anneal_temperature: bool = True,
        allowed_tokens: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_history: bool = False,
        callback: Callable[[int, Tensor], Any] | None = None,
        guidance_scale: float | None = None,
        return_stats: bool = False,
        block_size: int | None = None,
        cache: str | None = None,
        eos_id: int | None = None,
        eos_penalty: float = 0.0,
        **kwargs: Any,
    ) -> Tensor | tuple[Tensor, ...]:
        """Iterative demasking from a fully masked start (seed 002), or filling a prompt's masks.

        Returns (batch_size, seq_len) tokens, or (seq_len,) when batch_size is None (and the prompt,
        if any, is 1-D). `prompt` (seq_len,) or (B, seq_len): mask_id marks the positions to fill
        (prefix, suffix, holes); its other tokens are kept as given. `sampler`: a reveal rule's name
        (demask.samplers.RULES: "confidence", the seed's, ..., "threshold", "entropy_bound",
        "remdm", "halton", "dilated"), a rule object with its settings (`ThresholdRule(tau=0.8)`),
        or a whole `MaskedSampler` (then used as given: the sampling arguments here do not apply).
        The seed's arguments map onto `MaskedSampler`: start_temperature -> temperature (annealed to
        0 unless `anneal_temperature=False`), filter_thres -> its top-k, noise_level_scale -> the
        critic's noise. `allowed_tokens` (V,) or (seq_len, V) bool: the only tokens drawn,
        everywhere or at each position. `return_history=True` also returns the states after each
        step, (steps, B, seq_len) (batch dim dropped like the output); `return_stats=True` also
        the `Decoded` record of network calls. Exact MDLM sampling: sampler='ancestral',
        filter_thres=0, anneal_temperature=False. **kwargs go to the network.

        Conditions: with `cond_prefix_len` > 0 the prompt's first cond_prefix_len tokens are the
        condition, dropped where they are mask_id: kept masked, or, by a model trained with
        `predict_dropped_cond`, drawn first and then given (`masked_generation.draw_condition`);
        without it, every given token of the prompt is the condition. `guidance_scale=w`:
        classifier-free guidance, u + w (c - u) from the conditional c and unconditional u logits.

        Semi-autoregressive: `block_size=K` fills the canvas left to right in blocks of K
        positions, `steps` shared by the blocks (demask.decoding.blocks); `cache="prefix"` or
        `"dual"` reuses each block's first call's keys and values (approximate for a
        bidirectional net of depth > 1; demask.decoding.block_cache). `eos_id`: with blocks, a
        row stops after the first block holding it (the rest of the row becomes eos_id);
        `eos_penalty` (>= 0), subtracted from its logit, keeps it from filling a fixed canvas.
        """
        if batch_size is not None:
            check_int("batch_size", batch_size, min=1)
        check_float("start_temperature", start_temperature, min=0.0)
        check_float("filter_thres", filter_thres, min=0.0, max=1.0, max_inclusive=False)
        check_float("noise_level_scale", noise_level_scale, min=0.0)
        steps = self.steps if steps is None else check_int("steps", steps, min=1)
        if not isinstance(sampler, MaskedSampler):
            sampler = MaskedSampler(
                get_rule("confidence" if sampler is None else sampler),
                temperature=start_temperature,
                anneal=anneal_temperature,
                filter_thres=filter_thres,
                allowed_tokens=allowed_tokens,
                noise_scale=noise_level_scale,
                remask=self.can_mask_prev_unmasked,
            )
        seq, squeeze = start_canvas(
            batch_size, prompt, seq_len, mask_id=self.mask_id, num_tokens=self.num_tokens,
            max_seq_len=self.max_seq_len, device=next(self.net.parameters()).device,
        )  # fmt: skip
        b, n = seq.shape
        prefix = self._condition(None, b, n, seq.device) if self.cond_prefix_len else None
        drawn = None  # the dropped condition's pass, when there is one
        if guidance_scale is not None:  # checked before any network call
            check_float("guidance_scale", guidance_scale, min=0.0)
        eos = (eos_id, eos_penalty)
        blocks = block_options(block_size, cache, eos, self.mask_id, self.num_tokens)
        parts = (self.net, self.to_self_cond, self.token_critic, self.to_critic_logits, kwargs)
        history: list[Tensor] = []

        def on_step(step: int, tokens: Tensor) -> None:
            if return_history:
                history.append(tokens)
            if callback is not None:
                callback(step, tokens[0] if squeeze else tokens)

        watch = on_step if (return_history or callback is not None) else None
        with eval_mode(self):
            if prefix is not None and self.predict_dropped_cond:  # a dropped condition first
                plain = denoiser(parts, None, None, eos, self.num_tokens)
                loop = (self.schedule, sampler, generator)
                seq, drawn = draw_condition(plain, seq, prefix, self.mask_id, loop)
            state, guidance = initial_state(seq, self.mask_id, prefix, guidance_scale)
            model = denoiser(parts, guidance, cache, eos, self.num_tokens)
            if blocks is None:
                result = demask(model, state, self.schedule, steps, sampler, generator, watch)
            else:
                args = (model, state, self.schedule, steps, sampler, blocks, generator, watch)
                result = demask_blocks(*args)
        return output(result, squeeze, history if return_history else None, return_stats, drawn)
