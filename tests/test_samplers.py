"""Remasking strategies on synthetic proposals (no model): shared properties over the registry."""

import pytest
import torch

from demask.samplers import SAMPLERS, Proposal, StepInfo, get_sampler, mask_least_confident

param = pytest.mark.parametrize


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
    )


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


@param("name", sorted(SAMPLERS))
def test_select_shape_dtype_and_revealed_stay_revealed(name):
    sampler = get_sampler(name)
    prop = make_proposal(revealed_every=3)
    info = make_info(counts=(2, 1, 3))
    out = sampler.select(prop, info)
    assert out.shape == prop.rows.shape and out.dtype == torch.bool
    if not sampler.can_remask:
        assert not (out & ~prop.was_masked).any()


@param("name", sorted(n for n, c in SAMPLERS.items() if c.exact_counts))
def test_exact_counts_per_row(name):
    prop = make_proposal()
    counts = (3, 0, 9)
    out = get_sampler(name).select(prop, make_info(counts=counts))
    got = torch.bincount(prop.rows[out], minlength=3).tolist()
    assert got == list(counts)


@param("name", sorted(SAMPLERS))
def test_last_step_reveals_everything(name):
    prop = make_proposal()
    out = get_sampler(name).select(prop, make_info(counts=(0, 0, 0), before=0.1, after=0.0))
    assert not out.any()


def test_confidence_keeps_least_probable_masked_and_prefers_critic():
    prop = make_proposal()
    info = make_info(counts=(3, 0, 9))
    out = get_sampler("confidence").select(prop, info)
    assert torch.equal(
        out, mask_least_confident(prop.token_probs, prop.rows, info.num_masked_after)
    )
    prop.critic = torch.arange(prop.rows.numel(), dtype=torch.float)  # later = more likely wrong
    out = get_sampler("confidence").select(prop, info)
    row0 = out[prop.rows == 0]
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
    assert get_sampler("margin").select(prop, info).tolist() == [True, False, True, False]
    assert get_sampler("entropy").select(prop, info).tolist() == [True, False, True, False]


def test_random_is_uniform_over_positions():
    prop = make_proposal(per_row=(10, 10, 10))
    hits = torch.zeros(30)
    n = 4000
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        info = make_info(counts=(3, 3, 3))
        info.generator = g
        hits += get_sampler("random").select(prop, info).float()
    freq = hits / n  # each position stays masked with prob 3/10
    assert ((freq - 0.3).abs() < 5 * (0.3 * 0.7 / n) ** 0.5).all()


@param("before,after", [(1.0, 0.5), (0.6, 0.15), (0.3, 0.0)])
def test_ancestral_reveal_probability(before, after):
    per_row = (4000,)
    prop = make_proposal(per_row=per_row, revealed_every=4)
    out = get_sampler("ancestral").select(prop, make_info(counts=(0,), before=before, after=after))
    stay = out[prop.was_masked].float().mean().item()
    p = after / before  # P(still masked) = m(t) / m(s)
    n = int(prop.was_masked.sum())
    assert abs(stay - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-9
    assert not out[~prop.was_masked].any()


def test_unknown_sampler_name():
    with pytest.raises(ValueError, match="sampler"):
        get_sampler("greedy-ish")
