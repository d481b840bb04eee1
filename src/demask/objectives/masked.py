"""The masked-diffusion objective: times, masks, augmentation, MDLM weights and the loss.

Time convention of demask.schedules: t = 0 clean, t = 1 fully masked, mask ratio m(t).
Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models" (MDLM),
https://arxiv.org/abs/2406.07524: with tokens masked independently with probability m(t),

    NELBO = E_{t ~ U(0,1)} E_{mask} [ m'(t) / m(t) * sum_{i masked} -log p(x_i | x_masked) ]

(in nats per sequence; divide by the length for nats per token). Its value does not depend on the
schedule. The T-step discrete-time bound replaces m'(t) / m(t) dt by (m(t_i) - m(t_{i-1})) / m(t_i)
summed over t_i = i / T; it bounds the T-step sampler's likelihood and tends to the
continuous bound as T grows (gap ~ 1 / T).
The MaskGIT loss (Chang et al. 2022, https://arxiv.org/abs/2202.04200) is the plain mean
cross-entropy over masked positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from demask._checks import check_int
from demask.schedules import Schedule

__all__ = [
    "MaskedObjective",
    "TRAIN_MASKINGS",
    "augment_masked",
    "bell_mass",
    "condition_prior_loss",
    "count_masks",
    "discrete_step_weight",
    "draw_masks",
    "masked_loss",
    "mdlm_weight",
    "midpoint_times",
    "stratified_times",
]

MIN_TIME = 1e-6  # keeps m'(t) / m(t) finite; the interval it cuts holds a ~1e-6 share of the NELBO


def stratified_times(
    batch_size: int, *, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """(B,) times t_b = (u + b) / B mod 1 with one u ~ U(0, 1): each t_b is uniform, together they
    cover [0, 1] evenly (the low-discrepancy sampler of Kingma et al. 2021, arXiv 2107.00630)."""
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    t = (u + torch.arange(batch_size, device=device, dtype=torch.float64) / batch_size) % 1.0
    return t.clamp_min(MIN_TIME)


def midpoint_times(num_times: int, device=None) -> Tensor:
    """(K,) the fixed stratified times t_j = (j + 0.5) / K used by `nelbo`."""
    return (torch.arange(num_times, device=device, dtype=torch.float64) + 0.5) / num_times


def mdlm_weight(schedule: Schedule, t: Tensor) -> Tensor:
    """m'(t) / m(t) (1 / t for the linear schedule): positive, the continuous-time NELBO weight."""
    t = t.double()
    return schedule.mask_ratio_derivative(t) / schedule.mask_ratio(t).clamp_min(1e-12)


def discrete_step_weight(schedule: Schedule, t: Tensor, steps: int) -> Tensor:
    """(m(t) - m(t - 1/T)) / m(t): the weight of the T-step discrete-time NELBO at t = i / T."""
    t = t.double()
    s = (t - 1.0 / steps).clamp_min(0.0)
    m_t = schedule.mask_ratio(t)
    return (m_t - schedule.mask_ratio(s)) / m_t.clamp_min(1e-12)


def draw_masks(
    ratio: Tensor,  # (B,) mask probability per row
    shape: tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    device=None,
) -> Tensor:
    """(B, N) bool: every token masked independently with probability ratio[b] (Bernoulli)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return u < ratio.to(device=device, dtype=torch.float64)[:, None]


def augment_masked(
    x: Tensor,  # (B, N) clean tokens
    mask: Tensor,  # (B, N) bool, the positions of the loss
    *,
    mask_id: int,
    num_tokens: int,
    no_replace_prob: float = 0.0,
    random_token_prob: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The model input: mask_id at masked positions, with BERT's augmentation.

    Devlin et al. 2019, https://arxiv.org/abs/1810.04805: of the masked positions, a fraction
    `no_replace_prob` keeps its true token and a fraction `random_token_prob` gets a uniformly
    random token (never mask_id); the rest get mask_id. The loss still covers all of them.
    """
    u = torch.rand(x.shape, generator=generator, device=x.device)
    keep = mask & (u < no_replace_prob)
    rand = mask & (u >= no_replace_prob) & (u < no_replace_prob + random_token_prob)
    out = torch.where(mask & ~keep, torch.full_like(x, mask_id), x)
    if bool(rand.any()):
        noise = torch.randint(0, num_tokens - 1, x.shape, generator=generator, device=x.device)
        noise = noise + (noise >= mask_id).long()  # skip mask_id
        out = torch.where(rand, noise, out)
    return out


def count_masks(
    fillable: Tensor,  # (B, N) bool: the positions that may be masked (the rest is a condition)
    *,
    power: float = 0.0,
    mass: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training masks with an exact, stratified number of masked tokens per row.

    Returns (mask (B, N) bool, counts (B,) long, weights (B,) float64): row b masks exactly k_b
    of its F_b fillable tokens, a uniformly random subset. k_b is drawn from q(k) proportional to
    k^(-power) on {1..F_b} by the inverse CDF at stratified s_b (`stratified_times`), so the batch
    covers the range evenly; weights_b = 1 / (F_b q(k_b)) makes the row-mean cross-entropy an
    unbiased estimate under the uniform k of the bound below (importance sampling; power 0: k
    uniform, weights 1). k_b = 0 for a row with nothing to fill.

    Why: for any schedule, integrating the MDLM weight m'(t)/m(t) against the Bernoulli mask count
    gives exactly 1/k for a count of k (the integral of t^(k-1) (1-t)^(F-k) is a Beta function), so
        NELBO per token = E_{k ~ U{1..F}} [ (1/k) sum_{i masked} -log p(x_i | x_unmasked) ],
    the any-order autoregressive bound (Uria et al. 2014; Hoogeboom et al. 2022, arXiv 2110.02037).
    Drawing k directly and averaging the row's cross-entropy over its k masked tokens is an
    unbiased estimate of the same NELBO as the time-and-weight form, without its variance: no
    1/t weight meets a Binomial count near t = 0 (`masked_loss(..., counts=...)`). Per token that
    bound still weighs a row of k masked tokens by 1/k; power 0.5 minimises the gradient variance
    of independent, equally noisy tokens (sum_k 1 / (q(k) k) is smallest for q ~ k^-1/2).

    `mass`, when given, replaces k^(-power): it maps the counts 1..N (float64) to q unnormalised.
    """
    levels = torch.arange(1, fillable.shape[1] + 1, device=fillable.device, dtype=torch.float64)
    num = fillable.sum(-1)  # (B,)
    q_all = levels**-power if mass is None else mass(levels)  # (N,) q unnormalised
    counts, q = draw_counts(num, q_all, generator=generator)
    weights = 1.0 / (num.clamp_min(1) * q)
    return masks_of_counts(fillable, counts, generator=generator), counts, weights


def draw_counts(
    num: Tensor,  # (B,) long, the fillable tokens F_b of each row
    mass: Tensor,  # (N,) float64, q unnormalised over counts 1..N
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(counts (B,) long, q (B,) float64): row b's count k_b in 1..F_b drawn from q restricted to
    1..F_b by the inverse CDF at stratified s_b (`stratified_times`), and its probability q(k_b).
    k_b = 0 for a row with F_b = 0."""
    s = stratified_times(num.shape[0], generator=generator, device=num.device)  # (B,) float64
    cdf = mass.cumsum(0)  # (N,)
    total = cdf[(num - 1).clamp_min(0)]  # (B,) normaliser of each row's q on 1..F_b
    counts = torch.searchsorted(cdf, s * total, right=True) + 1  # (B,) inverse CDF
    counts = counts.minimum(num)  # in 1..F_b (0 if F_b = 0)
    return counts, mass[(counts - 1).clamp_min(0)] / total


def bell_mass(levels: Tensor) -> Tensor:
    """q(k) ~ r (1 - r) + 1/N at the mask rate r = k / N of the counts 1..N (float64): mostly
    half-masked rows, every count possible (the bell-shaped rates of Hong et al. 2026,
    arXiv 2605.13026)."""
    r = levels / len(levels)
    return r * (1 - r) + 1 / len(levels)


# how mean-CE training (use_simple_mdlm_loss_weight=False) masks: "schedule": a stratified time
# and Bernoulli(m(t)) masks, the loss the mean CE over every masked token of the batch (MaskGIT);
# "bell": an exact count per row drawn from `bell_mass`, the loss the mean over rows of the row's
# mean CE (no importance weights: not a NELBO estimate)
TRAIN_MASKINGS = ("schedule", "bell")


def masks_of_counts(
    fillable: Tensor, counts: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """(B, N) bool: row b masks a uniformly random subset of exactly counts[b] of its fillable
    positions."""
    scores = torch.rand(fillable.shape, generator=generator, device=fillable.device)
    scores = scores.masked_fill(~fillable, 2.0)  # never-masked positions rank last
    ranks = scores.argsort(dim=-1).argsort(dim=-1)  # (B, N) a random order of the fillable ones
    return ranks < counts[:, None]


def masked_loss(
    ce: Tensor,  # (M,) cross-entropy (nats) at the masked positions
    rows: Tensor,  # (M,) long, the batch row of each
    batch_size: int,
    seq_len: int | Tensor,  # tokens per row that count (an int, or (B,) with a condition)
    weight: Tensor | None = None,  # (B,) per-row token weight, or None for the MaskGIT mean
    counts: Tensor | None = None,  # (B,) masked tokens per row (from `count_masks`)
) -> Tensor:
    """The training loss, a scalar.

    With `counts` (MDLM, `count_masks`): mean over rows of the row's mean CE over its masked
    tokens (times `weight`, the importance weights of `count_masks`), an unbiased NELBO estimate
    in nats per token. With `weight` (m'(t_b)/m(t_b), MDLM in
    time form): mean over rows of sum_{masked} weight * CE / seq_len, the same estimate with more
    variance. With neither: MaskGIT's mean CE over all masked positions (0 when nothing is
    masked, so the batch still backpropagates).
    """
    if weight is None and counts is None:
        return ce.mean() if ce.numel() else ce.sum()
    per_row = torch.zeros(batch_size, device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)
    if counts is not None:
        row_mean = per_row / counts.to(ce.dtype).clamp_min(1)
        return (row_mean if weight is None else row_mean * weight.to(ce.dtype)).mean()
    assert weight is not None
    lengths = torch.as_tensor(seq_len, device=ce.device, dtype=ce.dtype).clamp_min(1)
    return (per_row * weight.to(ce.dtype) / lengths).sum() / batch_size


# predict(inp (B, N), mask (B, N) bool) -> (ce (M,) nats, logits (M, V), rows (M,), cols (M,)) at
# the masked positions: the wrapper's network call (self-conditioning included)
Predict = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def check_predict_dropped_cond(predict: bool, cond_drop_prob: float, cond_prefix_len: int) -> bool:
    """predict_dropped_cond needs condition dropout on a condition prefix."""
    if predict and not (cond_drop_prob > 0 and cond_prefix_len > 0):
        raise ValueError(
            "predict_dropped_cond=True needs condition dropout on a condition prefix "
            f"(cond_drop_prob > 0 and cond_prefix_len > 0), got cond_drop_prob={cond_drop_prob} "
            f"and cond_prefix_len={cond_prefix_len}"
        )
    return bool(predict)


def condition_prior_loss(x: Tensor, cond: Tensor, predict: Predict, mask_id: int) -> Tensor:
    """The condition's own term: -log p(condition) with every other token hidden.

    A model trained with `predict_dropped_cond` draws a condition it is not given first, on a
    canvas with everything else masked (`masked_generation.draw_condition`), then the rest given
    it. Rows that drop their condition see that canvas only when their count masks every token,
    so p(condition | nothing visible) would be learned from a few rows per run. This term scores
    it in every batch: each row's condition, an exact uniform count of its tokens masked
    (`count_masks`, an unbiased NELBO estimate per condition token; one token: its CE), every
    other token masked and not scored. Rows whose inputs are equal share one network row (a
    one-token class: one row per batch), so the cost is one row per distinct input.
    Returns the mean over rows of the row's mean CE over its masked condition tokens times the
    condition's share of the row (C_b / N): its nats per token of the row, the unit of the rest's
    loss. Weighed by 1 instead, the demo's digits lost 1% of NELBO for no better samples
    (docs/CLI.md, "The class prior").
    """
    b, n = x.shape
    cmask, counts, _ = count_masks(cond)  # (B, N) the condition tokens to predict
    inp = torch.where(cond & ~cmask, x, torch.full_like(x, mask_id))
    key = torch.cat([inp, cmask.long()], dim=1)  # (B, 2N): equal keys, equal network rows
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)  # (U, 2N), (B,)
    # predict's CE scores the unique rows against x's first rows: not used, the CE is taken below
    _, logits, rows_u, cols_u = predict(unique[:, :n], unique[:, n:].bool())
    slot = torch.full((len(unique), n), -1, dtype=torch.long, device=x.device)
    slot[rows_u, cols_u] = torch.arange(len(rows_u), device=x.device)
    rows, cols = cmask.nonzero(as_tuple=True)  # (M,) every row's masked condition tokens
    picked = logits[slot[inverse[rows], cols]]  # (M, V) the logits of each row's unique row
    ce = F.cross_entropy(picked.float(), x[rows, cols], reduction="none")
    size = cond.sum(-1)  # (B,) condition tokens per row
    return masked_loss(ce, rows, b, size, weight=size / n, counts=counts)  # share C_b / N


@dataclass(frozen=True)
class MaskedObjective:
    """The generator loss of a masked model: corrupt x, predict the masked tokens, weigh the CE.

    Built by `NonAutoregressiveWrapper` from its settings on every call. `mdlm` (the seed's
    use_simple_mdlm_loss_weight): the MDLM NELBO estimate, by exact mask counts (`estimator`
    "count", `count_masks` with `count_power`) or by a time and Bernoulli masks ("time", weight
    m'(t)/m(t)); otherwise MaskGIT's mean cross-entropy over masked positions, masked as
    `train_masking` says (`TRAIN_MASKINGS`).

    Condition dropout (`cond_drop_prob` per row): the condition becomes mask tokens. By default it
    is not scored. With `predict_dropped_cond` the dropped condition is part of the row instead:
    masked like the other tokens and predicted, so the model learns the condition and the rest
    jointly, and `generate` can draw a condition it is not given; every batch then also scores
    each row's condition with the rest hidden (`condition_prior_loss`), the canvas on which
    `generate` draws it.
    """

    schedule: Schedule
    mask_id: int
    num_tokens: int
    no_replace_prob: float
    random_token_prob: float
    cond_drop_prob: float
    mdlm: bool
    estimator: str = "count"
    count_power: float = 0.5
    train_masking: str = "schedule"
    predict_dropped_cond: bool = False

    def __call__(
        self, x: Tensor, cond: Tensor, predict: Predict
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, N) clean tokens, cond (B, N) bool given positions (never masked) ->
        (loss, logits (M, V), rows (M,), cols (M,)) with M the masked positions."""
        b, n = x.shape
        counts = t = weight = None
        given = cond  # before dropout: every row's condition is data for the condition's own term
        joint = self.predict_dropped_cond and self.cond_drop_prob > 0  # a dropped condition scored
        if joint:
            drop = torch.rand(b, device=x.device) < self.cond_drop_prob  # (B,)
            cond = cond & ~drop[:, None]  # these rows' condition is masked and scored like the rest
        if self.mdlm and self.estimator == "count":
            mask, counts, weight = count_masks(~cond, power=self.count_power)
        elif not self.mdlm and self.train_masking == "bell":
            mask, counts, _ = count_masks(~cond, mass=bell_mass)  # unweighted row means
        else:
            t = stratified_times(b, device=x.device)  # (B,)
            mask = draw_masks(self.schedule.mask_ratio(t), (b, n), device=x.device) & ~cond
        inp = augment_masked(
            x,
            mask,
            mask_id=self.mask_id,
            num_tokens=self.num_tokens,
            no_replace_prob=self.no_replace_prob,
            random_token_prob=self.random_token_prob,
        )
        if self.cond_drop_prob > 0 and not self.predict_dropped_cond:
            drop = torch.rand(b, device=x.device) < self.cond_drop_prob  # (B,)
            inp = inp.masked_fill(cond & drop[:, None], self.mask_id)
        ce, logits, rows, cols = predict(inp, mask)
        if self.mdlm and t is not None:
            weight = mdlm_weight(self.schedule, t)
        loss = masked_loss(ce, rows, b, (~cond).sum(-1), weight, counts)
        if joint:
            loss = loss + condition_prior_loss(x, given, predict, self.mask_id)
        return loss, logits, rows, cols

    def nelbo(
        self,
        x: Tensor,
        cond: Tensor,
        predict: Predict,
        num_times: int = 32,
        discrete_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B,) the MDLM negative ELBO of x (B, N) in bits per non-condition token, without
        augmentation. Continuous time: the times t_j = (j + 0.5) / num_times, one Bernoulli(m(t_j))
        mask draw each, weight m'(t)/m(t). `discrete_steps=T`: the T-step discrete-time bound,
        every t_i = i / T once with weight (m(t_i) - m(t_{i-1})) / m(t_i)."""
        b, n = x.shape
        if discrete_steps is None:
            times = midpoint_times(check_int("num_times", num_times, min=1), device=x.device)
            weights = mdlm_weight(self.schedule, times) / len(times)  # average over times
        else:
            steps = check_int("discrete_steps", discrete_steps, min=1)
            times = torch.arange(1, steps + 1, device=x.device, dtype=torch.float64) / steps
            weights = discrete_step_weight(self.schedule, times, steps)  # summed over steps
        total = torch.zeros(b, dtype=torch.float64, device=x.device)
        for t, w in zip(times, weights):
            ratio = self.schedule.mask_ratio(t.expand(b))
            mask = draw_masks(ratio, (b, n), generator=generator, device=x.device) & ~cond
            ce, _, rows, _ = predict(x.masked_fill(mask, self.mask_id), mask)
            total.index_add_(0, rows, ce.double() * w)
        return total / ((~cond).sum(-1).clamp_min(1) * math.log(2))  # (B,) bits per token
