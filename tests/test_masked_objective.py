"""The masked objective against a brute-force exact NELBO on a tiny vocabulary and length.

Exact continuous-time NELBO (schedule-invariant; MDLM, arXiv 2406.07524):
    sum over non-empty mask sets M (|M| = k) of (k-1)! (L-k)! / L! * sum_{i in M} -log p(x_i | x_M)
and the T-step discrete bound, summed over t_i = i / T with weight (m(t_i) - m(t_{i-1})) / m(t_i):
    sum_i sum_M m_i^k (1 - m_i)^(L-k) * w_i * sum_{i in M} -log p(x_i | x_M).
The Monte-Carlo estimators must match these in expectation, for linear and cosine schedules.
"""

import itertools
import math

import pytest
import torch

from demask import Encoder, NonAutoregressiveWrapper, TransformerWrapper
from demask.objectives.masked import (
    augment_masked,
    count_masks,
    draw_masks,
    masked_loss,
    mdlm_weight,
    stratified_times,
)
from demask.schedules import SCHEDULES, get_schedule

param = pytest.mark.parametrize
L, V, MASK = 5, 3, 3  # length 5, vocabulary 3, mask id 3
X = torch.tensor([0, 2, 1, 1, 0])


pytestmark = pytest.mark.usefixtures("one_thread")


SEED_SCHEDULES = {"linear": "linear", "cosine": "cosine", "callable": lambda p: 1 - p**2}


def tiny_wrapper(schedule="linear", **kw):
    torch.manual_seed(0)
    net = TransformerWrapper(
        num_tokens=V + 1, max_seq_len=L, attn_layers=Encoder(dim=16, depth=1, heads=2)
    )
    with torch.no_grad():  # sharpen the predictions so they depend on the context
        net.to_logits.weight.mul_(60)
    kw = dict(no_replace_prob=0.0, random_token_prob=0.0) | kw
    return NonAutoregressiveWrapper(net, mask_id=MASK, schedule=schedule, **kw).eval()


def _ce_table(net):
    """For every non-empty mask set: (k, sum over masked positions of -log p(x_i | x_M))."""
    masks = [m for m in itertools.product([False, True], repeat=L) if any(m)]
    mask = torch.tensor(masks)  # (2^L - 1, L)
    inp = X.expand(len(masks), L).masked_fill(mask, MASK)
    with torch.no_grad():
        logp = net(inp).double().log_softmax(-1)  # (S, L, V+1)
    nll = -logp.gather(-1, X.expand(len(masks), L)[..., None]).squeeze(-1)  # (S, L)
    return mask.sum(-1), (nll * mask).sum(-1)  # (S,), (S,)


def exact_nelbo(net):
    k, ce = _ce_table(net)
    coef = torch.tensor(
        [math.factorial(a - 1) * math.factorial(L - a) / math.factorial(L) for a in k.tolist()],
        dtype=torch.float64,
    )
    return float((coef * ce).sum())  # nats per sequence


def exact_discrete_nelbo(net, schedule, steps):
    k, ce = _ce_table(net)
    k = k.double()
    total = 0.0
    for i in range(1, steps + 1):
        m_t = float(schedule.mask_ratio(torch.tensor(i / steps, dtype=torch.float64)))
        m_s = float(schedule.mask_ratio(torch.tensor((i - 1) / steps, dtype=torch.float64)))
        prob = m_t**k * (1 - m_t) ** (L - k)  # P(this exact mask set)
        total += float((prob * (m_t - m_s) / m_t * ce).sum())
    return total


def test_brute_force_weights_sum_to_one_per_position():
    # sanity of the reference: sum_M coef(M) [i in M] = 1 for every position i
    total = sum(
        math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L) * math.comb(L - 1, k - 1)
        for k in range(1, L + 1)
    )
    assert total == pytest.approx(1.0)


@param("estimator", ["count", "count-0.5", "time"])
@param("name", sorted(SEED_SCHEDULES))
def test_training_loss_is_unbiased_nelbo(name, estimator):
    w = tiny_wrapper(SEED_SCHEDULES[name])
    w.mdlm_estimator = estimator.split("-")[0]
    if "-" in estimator:  # importance-sampled counts
        w.mdlm_count_power = float(estimator.split("-")[1])
    exact = exact_nelbo(w.net) / L  # nats per token
    torch.manual_seed(1)
    with torch.no_grad():
        losses = torch.tensor([float(w(X.expand(2048, L)).loss) for _ in range(24)])
    se = losses.std() / math.sqrt(len(losses))
    assert abs(losses.mean() - exact) < 4 * se + 1e-3 * exact, (losses.mean(), exact, se)
    # the 1 / (1 - t) weight (the known sign/denominator bug) lands far away
    assert abs(losses.mean() - exact) < 0.1 * exact


def test_count_estimator_has_far_less_variance_than_the_time_form():
    # both are unbiased (above); the exact-count form removes the 1/t weight's heavy tail
    w = tiny_wrapper("linear")
    stds = {}
    for estimator in ("count", "time"):
        w.mdlm_estimator = estimator
        torch.manual_seed(3)
        with torch.no_grad():
            losses = torch.tensor([float(w(X.expand(8, L)).loss) for _ in range(400)])
        stds[estimator] = float(losses.std())
    assert stds["count"] < 0.75 * stds["time"], stds


@param("power", [0.5, 1.0])
def test_importance_sampled_counts_follow_q_and_weigh_back_to_uniform(power):
    g = torch.Generator().manual_seed(0)
    fillable = torch.ones(8, 12, dtype=torch.bool)
    fillable[4:, 9:] = False  # rows 4..7: 9 fillable positions
    hist = torch.zeros(2, 13)
    wsum = torch.zeros(2, 13, dtype=torch.float64)
    for _ in range(4000):
        mask, counts, weights = count_masks(fillable, power=power, generator=g)
        assert torch.equal(mask.sum(-1), counts) and not bool((mask & ~fillable).any())
        for half, rows in ((0, slice(0, 4)), (1, slice(4, 8))):
            hist[half].index_add_(0, counts[rows], torch.ones(4))
            wsum[half].index_add_(0, counts[rows], weights[rows])
    for half, f in ((0, 12), (1, 9)):
        k = torch.arange(1, f + 1, dtype=torch.float64)
        q = k**-power / (k**-power).sum()
        assert float((hist[half, 1 : f + 1] / 16000 - q).abs().max()) < 0.02
        # weights * frequency = 1 / F per count: the uniform distribution the bound needs
        assert torch.allclose(
            wsum[half, 1 : f + 1] / 16000, torch.full((f,), 1 / f).double(), atol=0.01
        )


def test_count_masks_draws_exact_uniform_counts_inside_the_fillable_positions():
    g = torch.Generator().manual_seed(0)
    fillable = torch.ones(4, 10, dtype=torch.bool)
    fillable[1, :3] = False  # a 3-token condition: 7 fillable positions
    fillable[3] = False  # nothing to fill
    hist = torch.zeros(4, 11)
    for _ in range(3000):
        mask, counts, weights = count_masks(fillable, generator=g)
        assert torch.equal(weights, torch.ones(4, dtype=torch.float64))  # uniform: no weights
        assert torch.equal(mask.sum(-1), counts)  # exactly `counts` masked per row
        assert not bool((mask & ~fillable).any())  # never outside the fillable positions
        hist[torch.arange(4), counts] += 1
    assert hist[3, 0] == 3000  # the empty row masks nothing
    for row, f in ((0, 10), (1, 7), (2, 10)):
        freq = hist[row, 1 : f + 1] / 3000  # uniform on 1..F
        assert hist[row, 0] == 0 and float((freq - 1 / f).abs().max()) < 0.03, freq


def exact_midpoint_nelbo(net, schedule, num_times):
    """The expectation over masks of `nelbo` with times t_j = (j + 0.5) / K."""
    k, ce = _ce_table(net)
    k = k.double()
    total = 0.0
    for j in range(num_times):
        t = torch.tensor((j + 0.5) / num_times, dtype=torch.float64)
        m, dm = float(schedule.mask_ratio(t)), float(schedule.mask_ratio_derivative(t))
        total += float((m**k * (1 - m) ** (L - k) * dm / m * ce).sum()) / num_times
    return total


@param("name", sorted(SEED_SCHEDULES))
def test_nelbo_matches_exact(name):
    w = tiny_wrapper(SEED_SCHEDULES[name])
    exact = exact_nelbo(w.net)
    midpoint = exact_midpoint_nelbo(w.net, w.schedule, 32)
    assert midpoint == pytest.approx(exact, rel=5e-3)  # the fixed times integrate well
    g = torch.Generator().manual_seed(0)
    bits = w.nelbo(X.expand(2048, L), num_times=32, generator=g)  # (2048,)
    se = bits.std() / math.sqrt(len(bits))
    target = midpoint / L / math.log(2)
    assert abs(bits.mean() - target) < 4 * se + 1e-5 * target, (bits.mean(), target)


@param("name", ["linear", "cosine"])
@param("steps", [1, 4])
def test_discrete_nelbo_matches_exact(name, steps):
    w = tiny_wrapper(name)
    exact = exact_discrete_nelbo(w.net, w.schedule, steps) / L / math.log(2)
    g = torch.Generator().manual_seed(0)
    bits = w.nelbo(X.expand(4096, L), discrete_steps=steps, generator=g)
    se = bits.std() / math.sqrt(len(bits))
    assert abs(bits.mean() - exact) < 4 * se + 1e-5 * exact, (bits.mean(), exact)


def test_one_step_discrete_nelbo_is_sum_of_fully_masked_marginals():
    w = tiny_wrapper("cosine")
    with torch.no_grad():
        logp = w.net(torch.full((1, L), MASK)).double().log_softmax(-1)[0]  # (L, V+1)
    marginals = float(-logp.gather(-1, X[:, None]).sum())
    # float32 logits: a batch of every mask set and this one row may round differently by the
    # CPU's kernels (equal to the last bit on AMD EPYC, 1e-7 apart on an Intel Xeon)
    assert exact_discrete_nelbo(w.net, w.schedule, 1) == pytest.approx(marginals, rel=1e-6)


def test_discrete_nelbo_tends_to_continuous():
    # each T-step bound belongs to a different T-step generative model, so for an arbitrary
    # network it may sit on either side of the continuous one; the gap shrinks like 1 / T
    w = tiny_wrapper("cosine")
    cont = exact_nelbo(w.net)
    gaps = [abs(exact_discrete_nelbo(w.net, w.schedule, t) - cont) for t in (4, 16, 64, 256)]
    assert all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3 * cont
    assert gaps[-2] / gaps[-1] == pytest.approx(4, rel=0.1)


def test_nelbo_reduction_mean_and_determinism():
    w = tiny_wrapper()
    x = X.expand(8, L)
    a = w.nelbo(x, generator=torch.Generator().manual_seed(3))
    b = w.nelbo(x, reduction="mean", generator=torch.Generator().manual_seed(3))
    assert a.shape == (8,) and b.shape == ()
    assert float(b) == pytest.approx(float(a.mean()))


@param("name", sorted(SCHEDULES))
def test_mdlm_weights_positive_and_linear_is_one_over_t(name):
    t = torch.linspace(0.001, 1, 200, dtype=torch.float64)
    w = mdlm_weight(get_schedule(name), t)
    assert (w > 0).all() or name == "cosine" and (w[:-1] > 0).all()
    if name == "linear":
        assert torch.allclose(w, 1 / t)


def test_maskgit_loss_is_mean_ce_over_masked():
    ce = torch.tensor([1.0, 2.0, 3.0, 6.0])
    rows = torch.tensor([0, 0, 1, 2])
    assert float(masked_loss(ce, rows, 3, 10)) == pytest.approx(3.0)
    weight = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    # (2 * (1 + 2) + 1 * 3 + 0.5 * 6) / (3 rows * 10 tokens)
    assert float(masked_loss(ce, rows, 3, 10, weight)) == pytest.approx(12 / 30)
    assert float(masked_loss(ce[:0], rows[:0], 3, 10)) == 0.0


def test_maskgit_wrapper_loss_with_uniform_predictions_is_log_v():
    w = tiny_wrapper(use_simple_mdlm_loss_weight=False)
    with torch.no_grad():
        w.net.to_logits.weight.zero_()
        loss = w(X.expand(64, L)).loss
    assert float(loss) == pytest.approx(math.log(V + 1), rel=1e-5)


def test_masks_are_bernoulli_per_row():
    ratio = torch.tensor([0.0, 0.2, 0.7, 1.0])
    g = torch.Generator().manual_seed(0)
    mask = draw_masks(ratio, (4, 50_000), generator=g)
    freq = mask.double().mean(-1)
    assert freq[0] == 0 and freq[3] == 1
    assert torch.allclose(freq[1:3], ratio[1:3].double(), atol=5 * (0.25 / 50_000) ** 0.5)


def test_augmentation_frequencies():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 9, (200, 500), generator=g)
    x = x + (x >= 4).long()  # ids 0..9 without the mask id 4
    mask = torch.rand(x.shape, generator=g) < 0.5
    out = augment_masked(
        x, mask, mask_id=4, num_tokens=10, no_replace_prob=0.15, random_token_prob=0.1, generator=g
    )
    assert torch.equal(out[~mask], x[~mask])
    n = int(mask.sum())
    is_mask = (out[mask] == 4).double().mean()
    assert abs(is_mask - 0.75) < 0.01
    # kept = true token: no_replace (0.15) + random that hit the true token (0.1 / 9)
    same = (out[mask] == x[mask]).double().mean()
    assert abs(same - (0.15 + 0.1 / 9)) < 5 * (0.17 * 0.83 / n) ** 0.5
    off = torch.zeros(3, 7, dtype=torch.long)
    assert (augment_masked(off, off == 0, mask_id=5, num_tokens=6) == 5).all()


def test_stratified_times_cover_unit_interval():
    g = torch.Generator().manual_seed(0)
    t = stratified_times(8, generator=g)
    assert ((t > 0) & (t <= 1)).all()
    gaps = (t.sort().values.diff() * 8).round()
    assert torch.equal(gaps, torch.ones(7, dtype=torch.float64))
    means = torch.stack([stratified_times(1, generator=g) for _ in range(4000)]).mean()
    assert abs(float(means) - 0.5) < 5 * (1 / 12 / 4000) ** 0.5
