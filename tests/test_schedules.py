"""Schedules: boundary values, monotonicity, derivatives against finite differences, seed parity."""

import math

import pytest
import torch

from demask.schedules import SCHEDULES, CallableSchedule, get_schedule

param = pytest.mark.parametrize

# every registry entry, plus callables through autograd and through the float-only path
ALL = {name: get_schedule(name) for name in SCHEDULES} | {
    "callable_torch": get_schedule(lambda t: t**2),
    "callable_float": get_schedule(lambda t: 1 - math.cos(math.pi * t) / 2 - 0.5),
}
T = torch.linspace(0, 1, 101, dtype=torch.float64)


@param("name", sorted(ALL))
def test_boundaries_and_monotone(name):
    m = ALL[name].mask_ratio(T)
    assert m.shape == T.shape
    assert m[0].item() == pytest.approx(0.0, abs=1e-12)
    assert m[-1].item() == pytest.approx(1.0, abs=1e-12)
    assert (m.diff() >= 0).all()


@param("name", sorted(ALL))
def test_derivative_matches_finite_difference(name):
    s = ALL[name]
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    fd = (s.mask_ratio(t + h) - s.mask_ratio(t - h)) / (2 * h)
    d = s.mask_ratio_derivative(t)
    assert torch.allclose(d, fd, atol=1e-5)
    assert (s.mask_ratio_derivative(T) >= 0).all()


def test_callable_derivative_paths_agree_with_analytic():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    by_autograd = CallableSchedule(lambda t: torch.sin(t * math.pi / 2))
    by_difference = CallableSchedule(lambda t: math.sin(t * math.pi / 2))
    exact = torch.cos(t * math.pi / 2) * math.pi / 2
    assert torch.allclose(by_autograd.mask_ratio_derivative(t), exact, atol=1e-12)
    assert torch.allclose(by_difference.mask_ratio_derivative(t), exact, atol=1e-3)


@param(
    "name,seed_fn",
    [("linear", lambda p: 1 - p), ("cosine", lambda p: math.cos(math.pi * p / 2))],
)
def test_registry_matches_seed_progress_convention(name, seed_fn):
    # the seed's schedule speaks of progress p = 1 - t
    s = get_schedule(name)
    for p in torch.linspace(0, 1, 19).tolist():
        got = s.mask_ratio(torch.tensor(1 - p, dtype=torch.float64)).item()
        assert got == pytest.approx(seed_fn(p), abs=1e-12)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="schedule"):
        get_schedule("quadratic")


def test_not_a_callable():
    with pytest.raises(TypeError, match="schedule"):
        get_schedule(3)
