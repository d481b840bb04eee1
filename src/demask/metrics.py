"""Sample-quality metrics: a digits classifier's verdict on generated digits, and for text the
unigram entropy next to the generative perplexity under an autoregressive model.

Digits. A multinomial logistic regression is trained on the 1,500 real training digits (pixels
scaled to [0, 1]); the problem is convex, so the classifier does not depend on a seed, and it is
cached per process. For N images `digits_quality` reports

* ``mean_top_prob``: the mean over images of the classifier's top-class probability (high when
  images look like some digit; a Inception-Score-like "confidence", Salimans et al. 2016,
  https://arxiv.org/abs/1606.03498);
* ``class_entropy_bits``: the entropy in bits of the histogram of predicted classes (diversity;
  at most log2(10) = 3.32 bits when all ten digits are equally frequent);
* ``frechet_distance``: the Frechet distance between Gaussians fitted to the classifier's logits
  (10 features) of the 297 real validation digits and of the generated ones (FID, Heusel et al.
  2017, https://arxiv.org/abs/1706.08500, with the digits classifier in place of Inception).
  Like FID it is biased upwards for small N: compare runs at the same N.

Text. `generative_perplexity` is exp(mean NLL) of samples under an autoregressive model given as
`nll_fn(tokens (B, N)) -> (B, N-1)` per-token NLL in nats. A degenerate sampler that repeats one
token gets a low perplexity, so it is always reported with the samples' unigram entropy
(`text_quality` returns both; Zheng et al. 2024, https://arxiv.org/abs/2409.02908).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from demask._checks import check_int, check_tokens

DIGITS_LEVELS = 17
DIGITS_CLASSES = 10


# --------------------------------------------------------------------------- Frechet distance


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2).

    d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)). The trace of the matrix square
    root is computed as tr((s1 cov2 s1)^(1/2)) with s1 = cov1^(1/2): the same eigenvalues, but a
    symmetric matrix, so no complex parts and no scipy (Dowson & Landau 1982).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance needs means (d,) and covariances (d, d) of one size d, got "
            f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}"
        )
    s1 = _sqrtm_psd(cov1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ cov2 @ s1), 0.0, None)).sum()
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)
    return max(d2, 0.0)


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)  # (d,), (d, d)


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def digits_classifier() -> Any:
    """The digits classifier: sklearn LogisticRegression on the real training split, cached.

    Accuracy on the 297 validation digits: 0.976. Fitted with one BLAS thread: on a busy 2-core
    machine several threads made the 0.2 s fit take over 10 s.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from demask.data import digits_images, digits_labels

    x = digits_images("train").reshape(-1, 64) / (DIGITS_LEVELS - 1)  # (1500, 64) in [0, 1]
    y = digits_labels("train")
    with threadpool_limits(limits=1):
        return LogisticRegression(C=1.0, max_iter=2000).fit(x, y)


def _as_digit_pixels(images: Any) -> np.ndarray:
    """(N, 8, 8) or (N, 64) grey levels in [0, 16] (array or tensor) -> (N, 64) floats in [0, 1]."""
    x = images.detach().cpu() if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim == 3 and tuple(x.shape[1:]) == (8, 8):
        x = x.reshape(x.shape[0], 64)
    if x.dtype.is_floating_point:
        if not bool((x == x.round()).all()):
            raise ValueError("images must hold integral grey levels in [0, 16], got non-integers")
        x = x.long()
    check_tokens("images", x, num_tokens=DIGITS_LEVELS, ndim=2, seq_len=64)
    return x.numpy().astype(np.float64) / (DIGITS_LEVELS - 1)  # (N, 64)


@functools.lru_cache(maxsize=1)
def _reference_logits() -> tuple[np.ndarray, np.ndarray]:
    from demask.data import digits_images

    clf = digits_classifier()
    real = clf.decision_function(digits_images("val").reshape(-1, 64) / (DIGITS_LEVELS - 1))
    return _gaussian(real)


def real_digits_quality(num: int, draws: int = 20, seed: int = 0) -> dict[str, Any]:
    """What real digits score at `num` images: the yardstick for generated digits at that count.

    Draws `num` of the 1,500 real training digits (without replacement), `draws` times from a
    seeded generator, and averages `digits_quality`'s mean_top_prob and frechet_distance over the
    draws. The Frechet distance of a finite sample is biased upwards (measured: about 4.6 at 64
    digits, 2.4 at 200), so a generated set's distance means something only next to this one.
    Returns mean_top_prob, frechet_distance, frechet_distance_min, frechet_distance_max,
    num_images and draws.
    """
    from demask.data import digits_images

    real = digits_images("train")  # (1500, 8, 8)
    check_int("num", num, min=2, max=len(real))
    check_int("draws", draws, min=1)
    rng = np.random.default_rng(seed)
    scores = [digits_quality(real[rng.choice(len(real), num, replace=False)]) for _ in range(draws)]
    fd = [s["frechet_distance"] for s in scores]
    return {
        "mean_top_prob": float(np.mean([s["mean_top_prob"] for s in scores])),
        "frechet_distance": float(np.mean(fd)),
        "frechet_distance_min": float(min(fd)),
        "frechet_distance_max": float(max(fd)),
        "num_images": num,
        "draws": draws,
    }


def digits_class_accuracy(images: Any, labels: Any) -> float:
    """The share of `images` ((N, 8, 8) or (N, 64) grey levels) that the digits classifier puts
    in the class asked for, `labels` (N,) ints: how well class-conditional samples obey."""
    x = _as_digit_pixels(images)  # (N, 64)
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(x):
        raise ValueError(f"labels must hold one label per image ({len(x)}), got {len(y)}")
    return float((digits_classifier().predict(x) == y).mean())


def digits_quality(images: Any) -> dict[str, Any]:
    """Score generated digits with the digits classifier (see the module docstring).

    images: (N, 8, 8) or (N, 64) grey levels in [0, 16], N >= 2 (numpy array or tensor).
    Returns mean_top_prob, class_entropy_bits, frechet_distance, class_counts (10 ints) and
    num_images.
    """
    x = _as_digit_pixels(images)  # (N, 64)
    check_int("number of images", len(x), min=2)
    clf = digits_classifier()
    logits = clf.decision_function(x)  # (N, 10)
    probs = clf.predict_proba(x)  # (N, 10)
    counts = np.bincount(probs.argmax(axis=1), minlength=DIGITS_CLASSES)  # (10,)
    mu_real, cov_real = _reference_logits()
    mu, cov = _gaussian(logits)
    return {
        "mean_top_prob": float(probs.max(axis=1).mean()),
        "class_entropy_bits": entropy_bits(counts),
        "frechet_distance": frechet_distance(mu, cov, mu_real, cov_real),
        "class_counts": counts.tolist(),
        "num_images": len(x),
    }


# --------------------------------------------------------------------------- text


def entropy_bits(counts: Any) -> float:
    """Entropy in bits of the distribution given by non-negative counts."""
    c = np.asarray(counts, dtype=np.float64).reshape(-1)
    if c.size == 0 or c.sum() <= 0 or (c < 0).any():
        raise ValueError(f"counts must be non-negative with a positive sum, got {c.tolist()[:8]}")
    p = c[c > 0] / c.sum()
    return float(max(-(p * np.log2(p)).sum(), 0.0)) + 0.0  # + 0.0: no -0.0


def unigram_entropy(tokens: Any) -> float:
    """Entropy in bits of the empirical distribution of the token ids in `tokens` (any shape)."""
    t = torch.as_tensor(tokens).reshape(-1)  # (n,)
    if t.numel() == 0:
        raise ValueError("tokens must hold at least one token, got an empty tensor")
    check_tokens("tokens", t, num_tokens=int(t.max()) + 1, ndim=1)  # integers >= 0
    return entropy_bits(torch.bincount(t).numpy())


def generative_perplexity(
    nll_fn: Callable[[Tensor], Tensor], samples: Tensor, batch_size: int = 64
) -> float:
    """exp(mean per-token NLL) of `samples` (B, N) under `nll_fn(tokens) -> (B, N-1)` nats.

    Every predicted token counts once (tokens 1..N-1 of each sample); report it next to
    `unigram_entropy(samples)`.
    """
    if not isinstance(samples, Tensor) or samples.ndim != 2 or samples.shape[1] < 2:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be a (B, N) token tensor with N >= 2, got {shape}")
    check_int("batch_size", batch_size, min=1)
    total, count = 0.0, 0
    for chunk in samples.split(batch_size):  # (b, N)
        nll = torch.as_tensor(nll_fn(chunk)).double()  # (b, N-1)
        if tuple(nll.shape) != (chunk.shape[0], chunk.shape[1] - 1):
            raise ValueError(
                f"nll_fn must return per-token NLL of shape {(chunk.shape[0], chunk.shape[1] - 1)}"
                f" for tokens of shape {tuple(chunk.shape)}, got {tuple(nll.shape)}"
            )
        if not bool(torch.isfinite(nll).all()) or bool((nll < 0).any()):
            raise ValueError("nll_fn returned negative or non-finite NLL values")
        total, count = total + float(nll.sum()), count + nll.numel()
    return math.exp(total / count)


def causal_nll_fn(net: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Per-token NLL from a causal model `net(tokens (B, N)) -> logits (B, N, V)`.

    For an AutoregressiveWrapper pass its `.net`. Token n+1 is scored by the logits at n.
    """

    @torch.no_grad()
    def nll_fn(tokens: Tensor) -> Tensor:
        logits = net(tokens)  # (B, N, V)
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none"
        )  # (B, N-1)

    return nll_fn


def text_quality(
    samples: Tensor,
    nll_fn: Callable[[Tensor], Tensor] | None = None,
    reference: Any = None,
) -> dict[str, float]:
    """unigram_entropy_bits of the samples, gen_perplexity when `nll_fn` is given, and the
    reference_unigram_entropy_bits of real data (e.g. the val split) when `reference` is given."""
    out = {"unigram_entropy_bits": unigram_entropy(samples)}
    if nll_fn is not None:
        out["gen_perplexity"] = generative_perplexity(nll_fn, samples)
    if reference is not None:
        out["reference_unigram_entropy_bits"] = unigram_entropy(reference)
    return out
