"""The pure rules behind deliveries: backoff, crossings, event ids, input checks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from swarmgate.errors import RequestError
from swarmgate.webhooks.delivery import (
    MAX_BACKOFF_S,
    check_events,
    check_url,
    crossed_below,
    crossed_up,
    derived_event_id,
    month_of,
    month_start,
    retry_delay_s,
    usd,
)


@pytest.mark.parametrize(
    ("attempts", "backoff", "delay"),
    [
        (1, 30.0, 30.0),
        (2, 30.0, 60.0),
        (3, 30.0, 120.0),
        (8, 30.0, 3840.0),
        (10, 30.0, 15360.0),
        (11, 30.0, MAX_BACKOFF_S),  # 30720 s would pass the 6 h cap
        (1000, 30.0, MAX_BACKOFF_S),
        (0, 5.0, 5.0),
        (4, 0.05, 0.4),
    ],
)
def test_retry_delay_doubles_up_to_six_hours(attempts: int, backoff: float, delay: float) -> None:
    assert retry_delay_s(attempts, backoff) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("previous", "current", "line", "below", "up"),
    [
        (1_500_000, 900_000, 1_000_000, True, False),
        (1_000_000, 999_999, 1_000_000, True, False),  # from exactly on the line
        (999_999, 500_000, 1_000_000, False, False),  # already below: no second event
        (1_500_000, 1_000_000, 1_000_000, False, False),  # reaching the line is not below it
        (900_000, 1_000_000, 1_000_000, False, True),
        (0, 600_000, 500_000, False, True),
        (500_000, 600_000, 500_000, False, False),  # already reached
    ],
)
def test_crossings(previous: int, current: int, line: int, below: bool, up: bool) -> None:
    assert crossed_below(previous, current, line) is below
    assert crossed_up(previous, current, line) is up


def test_event_ids_are_stable_per_cause_and_fit_the_column() -> None:
    first = derived_event_id("job.completed", "job_1")
    assert first == derived_event_id("job.completed", "job_1")
    assert first != derived_event_id("job.completed", "job_2")
    assert first != derived_event_id("balance.low", "job_1")
    assert first.startswith("evt_") and len(first) <= 40


def test_months_are_utc_calendar_months() -> None:
    moment = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert month_of(moment) == "2026-12"
    assert month_start(moment) == datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "0.000000"), (1, "0.000001"), (1_500_000, "1.500000"), (-250, "-0.000250")],
)
def test_usd_strings_come_from_integers(micros: int, text: str) -> None:
    assert usd(micros) == text


@pytest.mark.parametrize(
    "url", ["https://example.com/hook", "http://127.0.0.1:9000/x?y=1", "https://[::1]/h"]
)
def test_urls_accepted(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    "url", ["ftp://example.com", "example.com/hook", "https://", "https://user:pw@example.com/"]
)
def test_urls_refused(url: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_url(url)
    assert caught.value.param == "url"


def test_events_are_deduplicated_into_one_order() -> None:
    chosen = check_events(["balance.low", "job.completed", "balance.low"], None)
    assert chosen == ["job.completed", "balance.low"]


@pytest.mark.parametrize(
    ("events", "threshold", "param"),
    [
        ([], None, "events"),
        (["job.started"], None, "events"),
        (["usage.threshold"], None, "usage_threshold_usd"),
        (["job.completed"], 5_000_000, "usage_threshold_usd"),
    ],
)
def test_events_refused(events: list[str], threshold: int | None, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_events(events, threshold)
    assert caught.value.param == param
