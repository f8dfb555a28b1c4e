"""Pricing arithmetic: ceil-once job costs and a split that never loses a micro-dollar."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swarmgate.billing.pricing import job_cost_micros, max_cost_micros, split_earnings
from swarmgate.catalog import Pricing

# $0.15 in / $0.60 out per 1M tokens, the shape of a small catalog model.
SMALL = Pricing(input_per_1m_micros=150_000, output_per_1m_micros=600_000)
FREE = Pricing(input_per_1m_micros=0, output_per_1m_micros=0)
ONE_MICRO = Pricing(input_per_1m_micros=1, output_per_1m_micros=1)


@pytest.mark.parametrize(
    ("pricing", "prompt", "completion", "expected"),
    [
        (SMALL, 0, 0, 0),  # nothing used, nothing charged
        (SMALL, 1, 0, 1),  # 0.15 micros rounds up: never free by rounding
        (SMALL, 0, 1, 1),  # 0.6 micros rounds up
        (SMALL, 1, 1, 1),  # 0.75: parts are summed before the one ceiling
        (SMALL, 10, 10, 8),  # 7.5 → 8
        (SMALL, 1_000_000, 0, 150_000),  # exact: no rounding
        (SMALL, 0, 1_000_000, 600_000),
        (SMALL, 1_000_000, 1_000_000, 750_000),
        (SMALL, 1_000_001, 0, 150_001),  # 150_000.15 → 150_001
        (SMALL, 3, 7, 5),  # 0.45 + 4.2 = 4.65 → 5
        (FREE, 123_456, 654_321, 0),  # a free model stays free
        (ONE_MICRO, 1, 0, 1),  # 1e-6 micros still costs 1
        (ONE_MICRO, 1_000_000, 0, 1),
        (ONE_MICRO, 1_000_000, 1, 2),
        (SMALL, 10**9, 10**9, 750_000_000),  # a billion tokens each way: $750
    ],
)
def test_job_cost_rounds_up_once(
    pricing: Pricing, prompt: int, completion: int, expected: int
) -> None:
    assert job_cost_micros(pricing, prompt, completion) == expected


@pytest.mark.parametrize(
    ("prompt", "completion", "error"),
    [
        (-1, 0, ValueError),
        (0, -5, ValueError),
        (1.0, 0, TypeError),  # a float token count is a bug upstream
        (0, 2.5, TypeError),
        (True, 0, TypeError),
        ("3", 0, TypeError),
    ],
)
def test_job_cost_refuses_bad_counts(prompt: Any, completion: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        job_cost_micros(SMALL, prompt, completion)


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "expected"),
    [(0, 0, 0), (100, 256, 169), (1, 1, 1), (4000, 4096, 3_058)],
)
def test_max_cost_prices_the_full_completion(prompt: int, max_tokens: int, expected: int) -> None:
    assert max_cost_micros(SMALL, prompt, max_tokens) == expected


@pytest.mark.parametrize(
    ("amount", "bps", "expected"),
    [
        (0, 8500, (0, 0)),
        (1, 8500, (0, 1)),  # the provider's share rounds down; the platform keeps the rest
        (7, 8500, (5, 2)),  # 5.95 → 5
        (100, 8500, (85, 15)),
        (999_999, 8500, (849_999, 150_000)),
        (1_000_000, 8500, (850_000, 150_000)),
        (123_456_789, 8500, (104_938_270, 18_518_519)),
        (1000, 10_000, (1000, 0)),
        (1000, 0, (0, 1000)),
        (3, 3333, (0, 3)),
        (10**15, 8500, (85 * 10**13, 15 * 10**13)),
    ],
)
def test_split_earnings(amount: int, bps: int, expected: tuple[int, int]) -> None:
    assert split_earnings(amount, bps) == expected


def test_split_defaults_to_85_percent() -> None:
    assert split_earnings(200) == (170, 30)


@pytest.mark.parametrize(
    ("amount", "bps", "error"),
    [
        (-1, 8500, ValueError),
        (100, 10_001, ValueError),
        (100, -1, ValueError),
        (1.5, 8500, TypeError),
        (100, 85.0, TypeError),
    ],
)
def test_split_refuses_bad_input(amount: Any, bps: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_earnings(amount, bps)


prices = st.builds(
    Pricing,
    input_per_1m_micros=st.integers(0, 100_000_000),
    output_per_1m_micros=st.integers(0, 100_000_000),
)
tokens = st.integers(0, 10_000_000)


@settings(max_examples=300, deadline=None)
@given(pricing=prices, prompt=tokens, completion=tokens)
def test_cost_is_the_ceiling_of_the_exact_cost(
    pricing: Pricing, prompt: int, completion: int
) -> None:
    exact_scaled = prompt * pricing.input_per_1m_micros + completion * pricing.output_per_1m_micros
    cost = job_cost_micros(pricing, prompt, completion)
    # cost - 1 < exact ≤ cost, all in integers scaled by 1M
    assert (cost - 1) * 1_000_000 < exact_scaled <= cost * 1_000_000


@settings(max_examples=300, deadline=None)
@given(pricing=prices, prompt=tokens, completion=tokens, extra=tokens)
def test_hold_covers_any_shorter_completion(
    pricing: Pricing, prompt: int, completion: int, extra: int
) -> None:
    assert max_cost_micros(pricing, prompt, completion + extra) >= job_cost_micros(
        pricing, prompt, completion
    )


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(0, 10**15), bps=st.integers(0, 10_000))
def test_split_conserves_every_micro(amount: int, bps: int) -> None:
    provider, platform = split_earnings(amount, bps)
    assert provider + platform == amount
    assert provider >= 0
    assert platform >= 0
    # provider ≤ exact share < provider + 1
    assert provider * 10_000 <= amount * bps < (provider + 1) * 10_000
