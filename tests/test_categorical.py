"""sample_categorical: empirical frequencies against softmax, argmax at temperature 0."""

import math

import pytest
import torch

from demask.samplers.categorical import gumbel_noise, sample_categorical
from demask.samplers.filters import top_k

N = 200_000


def _freqs(samples, vocab):
    return torch.bincount(samples.flatten(), minlength=vocab).double() / samples.numel()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax(temperature):
    # includes a rare token (prob ~ 3e-4) where float32 Gumbel noise would skew
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -6.0])
    gen = torch.Generator().manual_seed(1)
    samples = sample_categorical(logits.expand(N, -1), temperature, gen)  # (N,)
    assert samples.shape == (N,) and samples.dtype == torch.long
    p = (logits.double() / temperature).softmax(-1)
    f = _freqs(samples, 5)
    sigma = (p * (1 - p) / N).sqrt()
    # 5 standard errors per entry (plus a floor for the rare token): false alarms ~ 1e-6
    assert ((f - p).abs() <= 5 * sigma + 2e-5).all(), (f, p)
    # chi-square over the 5 cells with 4 degrees of freedom: P(chi2 > 30) ~ 5e-6
    chi2 = (((f - p) ** 2) / p).sum() * N
    assert chi2 < 30, chi2


def test_filtered_entries_never_drawn():
    logits = top_k(torch.randn(1000, 50, generator=torch.Generator().manual_seed(0)), k=3)
    gen = torch.Generator().manual_seed(2)
    samples = sample_categorical(logits, 1.5, gen)
    assert torch.isfinite(logits.gather(-1, samples[:, None])).all()


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 6, 11)
    assert torch.equal(sample_categorical(logits, 0.0), logits.argmax(-1))


def test_generator_repeats():
    logits = torch.randn(64, 30)
    a = sample_categorical(logits, 1.0, torch.Generator().manual_seed(5))
    b = sample_categorical(logits, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_gumbel_noise_moments():
    g = gumbel_noise((N,), generator=torch.Generator().manual_seed(3))
    assert g.dtype == torch.float64
    euler_gamma = 0.5772156649
    assert abs(g.mean().item() - euler_gamma) < 5 * (math.pi / math.sqrt(6)) / math.sqrt(N)
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


def test_negative_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        sample_categorical(torch.randn(3), -1.0)
