"""Logits filters against reference computations written with plain loops."""

import math

import pytest
import torch

from demask.samplers.filters import min_p, top_a, top_k, top_k_compact, top_k_count, top_p

param = pytest.mark.parametrize


def _logits(shape=(4, 7, 23), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _kept(x):
    return torch.isfinite(x)


@param("k", [1, 2, 5, 23])
def test_top_k_keeps_exactly_k_largest(k):
    logits = _logits()
    out = top_k(logits, k=k)
    kept = _kept(out)
    assert (kept.sum(-1) == k).all()
    assert torch.equal(out[kept], logits[kept])  # kept values are untouched
    # every kept logit is >= every removed logit of its row
    lo = torch.where(kept, logits, torch.inf).amin(-1)
    hi = torch.where(kept, -torch.inf, logits).amax(-1)
    assert (lo >= hi).all()


@param("thres", [0.0, 0.1, 0.5, 0.7, 0.9, 0.99])
@param("vocab", [1, 10, 23, 257])
def test_top_k_thres_count_is_the_seed_formula(thres, vocab):
    logits = _logits((3, vocab))
    expected = math.ceil((1 - thres) * vocab)  # the seed's filter_thres
    assert top_k_count(vocab, thres=thres) == expected
    assert (_kept(top_k(logits, thres=thres)).sum(-1) == expected).all()


def test_top_k_ties_keep_exactly_k():
    logits = torch.zeros(2, 9)
    assert (_kept(top_k(logits, k=4)).sum(-1) == 4).all()


@param(
    "bad", [dict(thres=1.0), dict(thres=-0.1), dict(k=0), dict(k=24), dict(), dict(k=2, thres=0.5)]
)
def test_top_k_bad_arguments(bad):
    with pytest.raises((ValueError, TypeError)):
        top_k(_logits(), **bad)


def test_top_k_error_names_filter_thres():
    with pytest.raises(ValueError, match="filter_thres"):
        top_k(_logits(), thres=1.0)


def _probs_rows(logits):
    return logits.double().softmax(-1).reshape(-1, logits.shape[-1])


@param("p", [0.05, 0.3, 0.9, 1.0])
def test_top_p_matches_loop_reference(p):
    logits = _logits()
    out = top_p(logits, p).reshape(-1, logits.shape[-1])
    for row_probs, row_out in zip(_probs_rows(logits), out):
        order = row_probs.argsort(descending=True).tolist()
        keep, mass = set(), 0.0
        for i in order:  # add tokens until the nucleus holds p
            if mass >= p:
                break
            keep.add(i)
            mass += row_probs[i].item()
        assert set(_kept(row_out).nonzero().flatten().tolist()) == keep


@param("p", [0.0, 0.05, 0.5, 1.0])
def test_min_p_matches_reference(p):
    logits = _logits()
    out = min_p(logits, p)
    probs = logits.double().softmax(-1)
    expected = probs >= p * probs.amax(-1, keepdim=True) * (1 - 1e-12)
    assert torch.equal(_kept(out), expected)
    assert (_kept(out).sum(-1) >= 1).all()


@param("a,power", [(0.2, 2.0), (0.02, 2.0), (1.0, 1.0), (0.5, 3.0)])
def test_top_a_matches_reference(a, power):
    logits = _logits()
    out = top_a(logits, a, power)
    probs = logits.double().softmax(-1)
    expected = probs >= a * probs.amax(-1, keepdim=True) ** power
    assert torch.equal(_kept(out), expected)
    assert (_kept(out).sum(-1) >= 1).all()  # the top token always survives


FILTERS = {  # every filter with one setting
    "top_k": lambda logits: top_k(logits, k=3),
    "filter_thres": lambda logits: top_k(logits, thres=0.9),
    "top_p": lambda logits: top_p(logits, 0.8),
    "min_p": lambda logits: min_p(logits, 0.1),
    "top_a": lambda logits: top_a(logits, 0.2),
}


def test_filters_preserve_shape_and_kept_values():
    logits = _logits()
    for name, fn in FILTERS.items():
        out = fn(logits)
        assert out.shape == logits.shape, name
        kept = _kept(out)
        assert torch.equal(out[kept], logits[kept]), name
        assert (kept.sum(-1) >= 1).all(), name


def test_top_k_compact_is_top_k_without_padding():
    logits = _logits()
    values, indices = top_k_compact(logits, thres=0.7)
    full = torch.full_like(logits, -math.inf).scatter_(-1, indices, values)
    assert torch.equal(full, top_k(logits, thres=0.7))
    assert (values.diff(dim=-1) <= 0).all()  # sorted, largest first
