"""Sample-quality metrics: Frechet distance against references, the digits classifier separating
real digits from noise, entropies and generative perplexity on exact cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from demask.data import digits_images
from demask.metrics import (
    causal_nll_fn,
    digits_classifier,
    digits_quality,
    entropy_bits,
    frechet_distance,
    generative_perplexity,
    real_digits_quality,
    text_quality,
    unigram_entropy,
)

# --------------------------------------------------------------------------- Frechet


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T  # full, non-commuting covariances
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(mu2, c2, mu1, c1) == pytest.approx(want, rel=1e-8)  # symmetric
    assert frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="one size d"):
        frechet_distance(mu1, c1, mu2[:5], c2[:5, :5])


# --------------------------------------------------------------------------- digits


def test_digits_classifier_is_accurate_on_val():
    from demask.data import digits_labels

    x = digits_images("val").reshape(-1, 64) / 16
    assert digits_classifier().score(x, digits_labels("val")) > 0.97  # measured 0.976


def test_digits_quality_separates_real_digits_from_noise():
    real = digits_quality(digits_images("train")[:297])  # real digits unseen by the reference
    noise = digits_quality(np.random.default_rng(0).integers(0, 17, size=(297, 8, 8)))
    # measured: top prob 0.917 vs 0.546, entropy 3.306 vs 2.599 bits, Frechet 2.7 vs 34.7
    assert real["mean_top_prob"] > 0.88 and noise["mean_top_prob"] < 0.6
    assert real["class_entropy_bits"] > 3.25 and noise["class_entropy_bits"] < 2.8
    assert real["frechet_distance"] < 4.0 and noise["frechet_distance"] > 25.0
    assert sum(real["class_counts"]) == real["num_images"] == 297
    val = digits_quality(torch.from_numpy(digits_images("val")).reshape(-1, 64))  # tokens
    assert val["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the reference itself


def test_digits_quality_of_one_repeated_digit_has_no_diversity():
    one = np.repeat(digits_images("val")[:1], 16, axis=0)
    q = digits_quality(one)
    assert q["class_entropy_bits"] == 0.0 and max(q["class_counts"]) == 16


def test_real_digits_quality_averages_seeded_draws_of_real_digits():
    q = real_digits_quality(64, draws=3, seed=5)
    rng = np.random.default_rng(5)  # the same draws, by hand
    real = digits_images("train")
    by_hand = [digits_quality(real[rng.choice(len(real), 64, replace=False)]) for _ in range(3)]
    fd = [s["frechet_distance"] for s in by_hand]
    assert q["frechet_distance"] == pytest.approx(np.mean(fd), rel=1e-12)
    assert (q["frechet_distance_min"], q["frechet_distance_max"]) == (min(fd), max(fd))
    assert q["mean_top_prob"] == pytest.approx(np.mean([s["mean_top_prob"] for s in by_hand]))
    assert (q["num_images"], q["draws"]) == (64, 3)
    assert real_digits_quality(64, draws=3, seed=5) == q  # seeded
    # the small-sample bias it exists to show: fewer digits, a larger distance
    assert real_digits_quality(297, draws=3)["frechet_distance"] < q["frechet_distance"]


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num": 1}, "num must be >= 2"), ({"num": 1501}, "num must be <= 1500"),
     ({"num": 64, "draws": 0}, "draws must be >= 1")],
)  # fmt: skip
def test_real_digits_quality_rejects_bad_counts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        real_digits_quality(**kwargs)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.full((4, 8, 8), 17), r"expected ids in \[0, 16\]"),
        (np.full((4, 8, 8), 0.5), "integral grey levels"),
        (np.zeros((4, 7, 7), dtype=int), "shape"),
        (np.zeros((1, 8, 8), dtype=int), "number of images must be >= 2"),
    ],
)
def test_digits_quality_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        digits_quality(images)


# --------------------------------------------------------------------------- text


def test_entropies_on_exact_cases():
    assert unigram_entropy(torch.tensor([[0, 0], [1, 1]])) == pytest.approx(1.0)
    assert unigram_entropy(torch.full((5, 7), 3)) == 0.0
    assert unigram_entropy(torch.arange(256).repeat(3)) == pytest.approx(8.0)
    assert entropy_bits([1] * 10) == pytest.approx(math.log2(10))
    with pytest.raises(ValueError, match="at least one token"):
        unigram_entropy(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        entropy_bits([1, -1])


def test_generative_perplexity_of_a_constant_nll_is_exact():
    samples = torch.randint(0, 7, (10, 9), generator=torch.Generator().manual_seed(0))
    calls = []

    def nll_fn(x):
        calls.append(x.shape[0])
        return torch.full((x.shape[0], x.shape[1] - 1), math.log(5.0))

    assert generative_perplexity(nll_fn, samples, batch_size=4) == pytest.approx(5.0)
    assert calls == [4, 4, 2]


def test_causal_nll_fn_matches_brute_force():
    vocab = 6
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def bigram_net(x):  # (B, N) -> (B, N, V): logits of the next token depend on this one
        return table[x]

    samples = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    logp = table.log_softmax(-1)
    brute = [-logp[s[i], s[i + 1]] for s in samples for i in range(11)]
    want = math.exp(float(torch.stack(brute).mean()))
    fn = causal_nll_fn(bigram_net)
    assert fn(samples).shape == (3, 11)
    assert generative_perplexity(fn, samples, batch_size=2) == pytest.approx(want, rel=1e-6)
    # a uniform model gives perplexity = vocabulary size
    uniform = causal_nll_fn(lambda x: torch.zeros(*x.shape, vocab))
    assert generative_perplexity(uniform, samples) == pytest.approx(vocab)


def test_generative_perplexity_rejects_bad_input():
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*got \(2, 5\)"):
        generative_perplexity(lambda t: torch.zeros(t.shape), x)
    with pytest.raises(ValueError, match="negative or non-finite"):
        generative_perplexity(lambda t: -torch.ones(2, 4), x)
    with pytest.raises(ValueError, match="N >= 2"):
        generative_perplexity(lambda t: t, torch.zeros(2, 1, dtype=torch.long))


def test_text_quality_reports_entropy_next_to_perplexity():
    samples = torch.tensor([[1, 2, 1, 2]])
    q = text_quality(samples, causal_nll_fn(lambda x: torch.zeros(*x.shape, 4)), samples)
    assert q == pytest.approx(
        {"unigram_entropy_bits": 1.0, "gen_perplexity": 4.0, "reference_unigram_entropy_bits": 1.0}
    )
    assert set(text_quality(samples)) == {"unigram_entropy_bits"}
