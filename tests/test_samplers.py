"""Masked samplers on synthetic logits (no model): shared properties over every reveal rule."""

import math

import pytest
import torch

from demask.decoding.masked import step_times
from demask.samplers import (
    RULES,
    EntropyBoundRule,
    FactorRule,
    HaltonRule,
    Logits,
    MaskedSampler,
    MaskedState,
    Proposal,
    ReMDMRule,
    StepInfo,
    StepTimes,
    ThresholdRule,
    get_rule,
    mask_least_confident,
)
from demask.samplers.dilated import DilatedRule, dilated_order
from demask.samplers.halton import halton_order
from demask.schedules import get_schedule

param = pytest.mark.parametrize
V, MASK = 6, 6  # 6 real tokens, mask id 6


def make_proposal(seed=0, batch=3, per_row=(7, 5, 9), vocab=6, revealed_every=0):
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.full((n,), b) for b, n in enumerate(per_row)])
    cols = torch.cat([torch.arange(n) for n in per_row])
    m = rows.numel()
    logits = torch.randn(m, vocab, generator=g) * 2
    probs = logits.softmax(-1)
    tokens = torch.multinomial(probs, 1, generator=g).squeeze(-1)
    was_masked = torch.ones(m, dtype=torch.bool)
    if revealed_every:
        was_masked[::revealed_every] = False
    return Proposal(
        rows=rows,
        cols=cols,
        was_masked=was_masked,
        tokens=tokens,
        probs=probs,
        token_probs=probs.gather(-1, tokens[:, None]).squeeze(-1),
    )


def make_info(counts=(3, 0, 9), before=0.8, after=0.5, seed=0):
    return StepInfo(
        batch_size=len(counts),
        num_masked_after=torch.tensor(counts),
        ratio_before=before,
        ratio_after=after,
        generator=torch.Generator().manual_seed(seed),
        seq_len=9,
    )


# ----------------------------------------------------------------- the step() loop, synthetic
def random_logits(seed, b, n):
    return torch.randn(b, n, V + 1, generator=torch.Generator().manual_seed(seed)) * 3


def decode(sampler, tokens, steps, logits_of, generator=None, fillable=None):
    """The demasking loop with `logits_of(state) -> (B, N, V + 1)` in place of a network."""
    state = MaskedState(tokens, tokens == MASK if fillable is None else fillable, MASK)
    schedule = get_schedule("linear")
    for step in range(1, steps + 1):
        if not bool(state.masked.any()):
            break
        rows, cols = sampler.candidates(state).nonzero(as_tuple=True)
        logits = Logits(rows, cols, logits_of(state)[rows, cols])
        state = sampler.step(logits, state, step_times(schedule, step, steps), generator)
    return state.tokens


def with_holes(b=3, n=10):
    tokens = torch.full((b, n), MASK)
    tokens[0, :3] = torch.tensor([1, 2, 3])
    tokens[1, 5] = 4
    tokens[2, ::4] = 0
    return tokens


@param("name", sorted(RULES))
@param("steps", [1, 4, 10])
def test_no_mask_left_and_given_tokens_unchanged(name, steps):
    start = with_holes()
    sampler = MaskedSampler(get_rule(name), remask=True)
    g = torch.Generator().manual_seed(0)
    out = decode(sampler, start, steps, lambda s: random_logits(int(s.masked.sum()), 3, 10), g)
    assert not (out == MASK).any()
    given = start != MASK
    assert torch.equal(out[given], start[given])


@param("name", sorted(RULES))
def test_fixed_generator_repeats(name):
    sampler = MaskedSampler(get_rule(name), temperature=2.0, anneal=False, filter_thres=0.0)
    start = torch.full((4, 10), MASK)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return decode(sampler, start, 5, lambda s: random_logits(1, 4, 10) / 3, g)

    runs = [run(7), run(7), run(8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@param("name", sorted(RULES))
def test_one_hot_logits_give_their_sequence(name):
    target = torch.tensor([[3, 1, 4, 1, 5, 0, 2, 5, 3], [5, 0, 2, 2, 4, 1, 3, 0, 0]])
    one_hot = torch.nn.functional.one_hot(target, V + 1).float() * 60
    sampler = MaskedSampler(get_rule(name), temperature=2.0, filter_thres=0.0)
    out = decode(sampler, torch.full((2, 9), MASK), 4, lambda s: one_hot)
    assert torch.equal(out, target)


@param("name", sorted(RULES))
def test_select_shape_dtype_and_revealed_stay_revealed(name):
    rule = get_rule(name)
    prop = make_proposal(revealed_every=3)
    out = rule.select(prop, make_info(counts=(2, 1, 3)))
    assert out.shape == prop.rows.shape and out.dtype == torch.bool
    if not rule.can_remask:
        assert not (out & ~prop.was_masked).any()


@param("name", sorted(n for n, c in RULES.items() if c.exact_counts))
def test_exact_counts_per_row(name):
    prop = make_proposal()
    counts = (3, 0, 9)
    out = get_rule(name).select(prop, make_info(counts=counts))
    assert torch.bincount(prop.rows[out], minlength=3).tolist() == list(counts)


@param("name", sorted(RULES))
def test_last_step_reveals_everything(name):
    prop = make_proposal()
    out = get_rule(name).select(prop, make_info(counts=(0, 0, 0), before=0.1, after=0.0))
    assert not out.any()


# ----------------------------------------------------------------- fixed-count rules
def test_mask_least_confident_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4, (40,), generator=g)
    conf = torch.rand(40, generator=g)
    counts = torch.tensor([2, 0, 5, 100])
    out = mask_least_confident(conf, rows, counts)
    for b in range(4):
        idx = (rows == b).nonzero().flatten()
        lowest = idx[conf[idx].argsort()][: counts[b]]
        assert set(out.nonzero().flatten().tolist()) & set(idx.tolist()) == set(lowest.tolist())


def test_confidence_keeps_least_probable_masked_and_prefers_critic():
    prop = make_proposal()
    info = make_info(counts=(3, 0, 9))
    out = get_rule("confidence").select(prop, info)
    assert torch.equal(
        out, mask_least_confident(prop.token_probs, prop.rows, info.num_masked_after)
    )
    prop.critic = torch.arange(prop.rows.numel(), dtype=torch.float)  # later = more likely wrong
    row0 = get_rule("confidence").select(prop, info)[prop.rows == 0]
    assert row0.tolist() == [False] * 4 + [True] * 3


def test_margin_and_entropy_rank_by_their_measure():
    probs = torch.tensor(
        [[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.4, 0.3, 0.3], [1.0, 0.0, 0.0]]
    )  # margins 0, .8, .1, 1 ; entropies ln2, .33, 1.09, 0
    prop = Proposal(
        rows=torch.zeros(4, dtype=torch.long),
        cols=torch.arange(4),
        was_masked=torch.ones(4, dtype=torch.bool),
        tokens=torch.zeros(4, dtype=torch.long),
        probs=probs,
        token_probs=probs[:, 0],
    )
    info = make_info(counts=(2,))
    assert get_rule("margin").select(prop, info).tolist() == [True, False, True, False]
    assert get_rule("entropy").select(prop, info).tolist() == [True, False, True, False]


def test_random_is_uniform_over_positions():
    prop = make_proposal(per_row=(10, 10, 10))
    hits = torch.zeros(30)
    n = 4000
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        info = make_info(counts=(3, 3, 3))
        info.generator = g
        hits += get_rule("random").select(prop, info).float()
    freq = hits / n  # each position stays masked with prob 3/10
    assert ((freq - 0.3).abs() < 5 * (0.3 * 0.7 / n) ** 0.5).all()


@param("before,after", [(1.0, 0.5), (0.6, 0.15), (0.3, 0.0)])
def test_ancestral_reveal_probability(before, after):
    prop = make_proposal(per_row=(4000,), revealed_every=4)
    out = get_rule("ancestral").select(prop, make_info(counts=(0,), before=before, after=after))
    stay = out[prop.was_masked].float().mean().item()
    p = after / before  # P(still masked) = m(t) / m(s)
    n = int(prop.was_masked.sum())
    assert abs(stay - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-9
    assert not out[~prop.was_masked].any()


def test_unknown_rule_name_and_settings_for_an_object():
    with pytest.raises(ValueError, match="sampler"):
        get_rule("greedy-ish")
    with pytest.raises(ValueError, match="by name"):
        get_rule(ThresholdRule(), tau=0.5)
    assert get_rule("threshold", tau=0.5).tau == 0.5


# ----------------------------------------------------------------- adaptive rules
def synthetic(confidences, rows=None):
    """A proposal whose sampled tokens have the given probabilities (spread over V = 4)."""
    c = torch.tensor(confidences, dtype=torch.float)
    rest = ((1 - c) / 3)[:, None].expand(-1, 3)
    probs = torch.cat([c[:, None], rest], -1)
    rows = torch.zeros(len(c), dtype=torch.long) if rows is None else torch.tensor(rows)
    m = len(c)
    return Proposal(rows, torch.arange(m), torch.ones(m, dtype=torch.bool),
                    torch.zeros(m, dtype=torch.long), probs, c)  # fmt: skip


def loose_info(prop):
    """No schedule pressure: the schedule would keep every candidate masked."""
    b = int(prop.rows.max()) + 1
    return make_info(counts=tuple(torch.bincount(prop.rows, minlength=b).tolist()))


@param("tau", [0.3, 0.5, 0.7, 0.9])
def test_threshold_reveals_exactly_the_positions_above_tau(tau):
    g = torch.Generator().manual_seed(1)
    c = torch.rand(50, generator=g).tolist()
    rows = torch.randint(0, 3, (50,), generator=g).tolist()
    prop = synthetic(c, rows)
    stay = ThresholdRule(tau).select(prop, loose_info(prop))
    above = prop.token_probs >= tau
    for b in range(3):  # each row: exactly the ones above tau, or its most confident one
        r = prop.rows == b
        want = above[r] if above[r].any() else prop.token_probs[r] == prop.token_probs[r].max()
        assert torch.equal(~stay[r], want)


def test_threshold_follows_the_schedule_where_it_asks_for_more():
    prop = synthetic([0.95, 0.2, 0.3, 0.1, 0.92])
    stay = ThresholdRule(0.9).select(prop, make_info(counts=(1,)))  # schedule: 1 left masked
    assert stay.tolist() == [False, False, False, True, False]


@param("factor", [0.5, 1.0, 2.0])
def test_factor_rule_reveals_the_largest_n_with_the_bound(factor):
    c = [0.99, 0.97, 0.9, 0.8, 0.5, 0.3]
    stay = FactorRule(factor).select(synthetic(c), loose_info(synthetic(c)))
    n = max([k for k in range(1, 7) if (k + 1) * (1 - sorted(c)[::-1][k - 1]) < factor] or [1])
    assert (~stay).tolist() == [i < n for i in range(6)]


def test_entropy_bound_reveals_the_largest_prefix_within_gamma():
    c = [0.99, 0.9, 0.7, 0.5, 0.97]
    prop = synthetic(c)
    h = -(prop.probs * prop.probs.clamp_min(1e-30).log()).sum(-1)
    order = sorted(range(5), key=lambda i: -c[i])
    for gamma in (0.0, 0.2, 1.0, 3.0, 10.0):
        stay = EntropyBoundRule(gamma).select(prop, loose_info(prop))
        size = max(k for k in range(1, 6)
                   if sum(h[order[:k]]) - max(h[order[:k]]) <= gamma)  # fmt: skip
        assert set((~stay).nonzero().flatten().tolist()) == set(order[:size])


def test_entropy_bound_rows_do_not_mix():
    prop = synthetic([0.99, 0.98, 0.97, 0.6, 0.99, 0.5], rows=[0, 0, 0, 1, 1, 1])
    stay = EntropyBoundRule(0.3).select(prop, loose_info(prop))
    alone = EntropyBoundRule(0.3).select(synthetic([0.99, 0.98, 0.97]), make_info(counts=(3,)))
    assert torch.equal(stay[:3], alone)


def test_remdm_remasks_revealed_tokens_at_rate_sigma():
    prop = make_proposal(per_row=(20000,), revealed_every=2)
    info = make_info(counts=(0,), before=0.5, after=0.4)
    out = ReMDMRule(eta=0.1).select(prop, info)
    sigma = min(0.1, 0.4 / 0.5)
    back = out[~prop.was_masked].float().mean().item()
    reveal = (0.6 - (1 - sigma) * 0.5) / 0.5
    stay = out[prop.was_masked].float().mean().item()
    assert abs(back - sigma) < 0.01 and abs(stay - (1 - reveal)) < 0.015
    assert not ReMDMRule(eta=0.0).select(prop, info)[~prop.was_masked].any()


def test_remdm_decoding_remasks_on_the_way():
    sampler = MaskedSampler(ReMDMRule(eta=0.5), filter_thres=0.0)
    start = torch.full((2, 12), MASK)
    state = MaskedState(start, start == MASK, MASK)
    schedule, g, back = get_schedule("linear"), torch.Generator().manual_seed(0), 0
    for step in range(1, 9):
        rows, cols = sampler.candidates(state).nonzero(as_tuple=True)
        logits = Logits(rows, cols, random_logits(step, 2, 12)[rows, cols])
        new = sampler.step(logits, state, step_times(schedule, step, 8), g)
        back += int(((state.tokens != MASK) & (new.tokens == MASK)).sum())
        state = new
    assert back > 0 and not (state.tokens == MASK).any()


@param("n,width", [(16, 4), (64, 8), (20, 5), (10, 10), (17, 4)])
def test_halton_order_is_a_permutation(n, width):
    rank = halton_order(n, width)
    assert sorted(rank.tolist()) == list(range(n))


def test_halton_spreads_the_first_tokens_over_the_image():
    rank = halton_order(64, 8).view(8, 8)
    first = (rank < 8).nonzero()  # (8, 2) (row, column); a raster order would fill one row
    assert len(set(first[:, 1].tolist())) == 8 and len(set(first[:, 0].tolist())) >= 6
    stay = HaltonRule(width=8).select(
        Proposal(
            torch.zeros(64, dtype=torch.long),
            torch.arange(64),
            torch.ones(64, dtype=torch.bool),
            torch.zeros(64, dtype=torch.long),
            torch.ones(64, 1),
            torch.ones(64),
        ),  # fmt: skip
        StepInfo(1, torch.tensor([60]), 1.0, 60 / 64, seq_len=64),
    )
    assert torch.equal(~stay, (rank < 4).flatten())


@param("n", [1, 2, 7, 16, 100, 256])
def test_dilated_order_is_a_permutation(n):
    assert sorted(dilated_order(n).tolist()) == list(range(n))


def test_dilated_order_halves_the_gaps():
    rank = dilated_order(64)
    for k in (1, 2, 4, 8, 16, 32):  # the first k positions are every (64 / k)-th one
        assert sorted((rank < k).nonzero().flatten().tolist()) == list(range(0, 64, 64 // k))


def test_dilated_rule_reveals_the_earliest_fillable_positions_in_every_row():
    # row 0: all 16 positions masked; row 1: positions 0..7 given (only 8..15 are candidates)
    rows = torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(8, dtype=torch.long)])
    cols = torch.cat([torch.arange(16), torch.arange(8, 16)])
    m = rows.numel()
    proposal = Proposal(rows, cols, torch.ones(m, dtype=torch.bool),
                        torch.zeros(m, dtype=torch.long), torch.ones(m, 1), torch.ones(m))  # fmt: skip
    stay = DilatedRule().select(proposal, StepInfo(2, torch.tensor([12, 5]), 1.0, 0.75, seq_len=16))
    revealed = [sorted(cols[(rows == b) & ~stay].tolist()) for b in (0, 1)]
    assert revealed == [[0, 4, 8, 12], [8, 10, 12]]  # row 1: 8, 12, 10 are first in the order
    assert get_rule("dilated").select(proposal, StepInfo(2, torch.tensor([12, 5]), 1.0, 0.75,
                                                          seq_len=16)).equal(stay)  # fmt: skip


def test_step_times_anneal_and_counts():
    t = StepTimes(step=2, steps=8, ratio_before=0.875, ratio_after=0.75)
    assert t.anneal == 6 / 8
    assert t.num_masked_after(torch.tensor([8, 3, 0])).tolist() == [6, 2, 0]
    assert math.isclose(step_times(get_schedule("linear"), 2, 8).ratio_after, 0.75)


def test_threshold_step_reveals_exactly_the_positions_above_tau_from_logits():
    """Through MaskedSampler.step: greedy draws, so each position's confidence is its top
    probability, set by the synthetic logits."""
    top = torch.tensor([0.95, 0.5, 0.91, 0.2, 0.99, 0.89])  # wanted top probabilities
    rest = torch.log((1 - top) / (V - 1))  # the other V - 1 real tokens share the rest
    logits = rest[:, None].expand(-1, V + 1).clone()
    logits[:, 2] = torch.log(top)
    start = torch.full((1, 6), MASK)
    state = MaskedState(start, start == MASK, MASK)
    rows, cols = state.masked.nonzero(as_tuple=True)
    sampler = MaskedSampler(ThresholdRule(0.9), temperature=0.0, filter_thres=0.0)
    times = step_times(get_schedule("linear"), 1, 100)  # the schedule asks for one reveal only
    new = sampler.step(Logits(rows, cols, logits), state, times)
    assert (new.tokens[0] != MASK).tolist() == (top >= 0.9).tolist()
    assert (new.tokens[0][top >= 0.9] == 2).all()
