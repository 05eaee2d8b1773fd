"""Exponential backoff with full jitter: bounds, cap, reset."""

from __future__ import annotations

import pytest

from edge_agent.backoff import Backoff


def test_bounds_double_until_the_cap() -> None:
    b = Backoff(base=1.0, cap=10.0, rng=lambda: 1.0)
    assert [b.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.attempt == 6


def test_full_jitter_is_uniform_below_the_bound() -> None:
    draws = iter([0.0, 0.5, 0.25])
    b = Backoff(base=2.0, cap=100.0, rng=lambda: next(draws))
    assert b.next() == 0.0  # 0 * 2
    assert b.next() == 2.0  # 0.5 * 4
    assert b.next() == 2.0  # 0.25 * 8


def test_real_random_stays_within_bounds() -> None:
    b = Backoff(base=0.5, cap=30.0)
    for _ in range(200):
        bound = b.bound()
        assert 0.0 <= b.next() <= bound <= 30.0


def test_reset_starts_over() -> None:
    b = Backoff(base=1.0, cap=60.0, rng=lambda: 1.0)
    for _ in range(5):
        b.next()
    b.reset()
    assert b.attempt == 0
    assert b.next() == 1.0


def test_many_failures_do_not_overflow() -> None:
    b = Backoff(base=1.0, cap=5.0, rng=lambda: 1.0)
    for _ in range(5000):
        assert b.next() <= 5.0


@pytest.mark.parametrize("kwargs", [{"base": 0}, {"base": 2, "cap": 1}, {"factor": 0.5}])
def test_invalid_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)
