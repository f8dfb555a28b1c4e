"""The dashboard's pure parts: charts, money typed into forms, redirects, device states."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from swarmgate.dashboard import charts
from swarmgate.dashboard.pages import key_changes, usd_field
from swarmgate.dashboard.reports import ModelStatus, describe_state
from swarmgate.dashboard.web import Form, csrf_for_session, safe_next, tokens_match
from swarmgate.errors import RequestError
from swarmgate.routing.registry import DeviceConnection
from swarmgate.routing.states import ConnectionState


def form(fields: Mapping[str, str | list[str]]) -> Form:
    return Form({k: v if isinstance(v, list) else [v] for k, v in fields.items()})


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [
        (0, 1),
        (1, 1),
        (2, 2),
        (3, 5),
        (5, 5),
        (6, 10),
        (11, 20),
        (99, 100),
        (101, 200),
        (4_999, 5_000),
        (5_001, 10_000),
        (123_456_789, 200_000_000),
    ],
)
def test_nice_ceiling(value: int, ceiling: int) -> None:
    assert charts.nice_ceiling(value) == ceiling


def test_stacked_bars_scale_to_the_tallest_day_and_escape_every_label() -> None:
    series = charts.series_for(["<script>alert(1)</script>", "b"])
    svg = charts.stacked_bars(
        ["d1", "d2", "d3"],
        series,
        {("d1", series[0].name): 50, ("d1", "b"): 50, ("d2", "b"): 25},
        label=str,
        title='Spend "by" day',
    )
    assert "<script>" not in svg
    assert "&lt;script&gt;" in svg
    assert 'aria-label="Spend &quot;by&quot; day"' in svg
    assert svg.count("<rect") == 3  # empty days draw nothing
    # The tallest bar (100 of a scale of 100) fills the plot: 200 - 10 - 24 = 166 px.
    heights = [float(part.split('"')[0]) for part in svg.split('height="')[1:]]
    assert sorted(heights) == [41.5, 83.0, 83.0]


def test_series_past_the_palette_share_one_colour() -> None:
    names = [f"m{i}" for i in range(charts.MAX_SERIES + 3)]
    colours = [s.colour for s in charts.series_for(names)]
    assert len(set(colours[: charts.MAX_SERIES])) == charts.MAX_SERIES
    assert set(colours[charts.MAX_SERIES :]) == {charts.OTHER_COLOUR}


@pytest.mark.parametrize(
    ("typed", "micros"),
    [
        ("5", 5_000_000),
        ("$12.50", 12_500_000),
        ("1,000", 1_000_000_000),
        ("0.000001", 1),
        (" 7.25 ", 7_250_000),
        ("", None),
    ],
)
def test_dollars_typed_into_a_form_are_exact_micro_dollars(typed: str, micros: int | None) -> None:
    assert usd_field(form({"amount_usd": typed}), "amount_usd", "The amount") == micros


@pytest.mark.parametrize("typed", ["ten", "0.0000001", "-5", "0", "NaN", "Infinity", "1e400"])
def test_dollars_that_are_not_an_amount_are_refused(typed: str) -> None:
    with pytest.raises(RequestError):
        usd_field(form({"amount_usd": typed}), "amount_usd", "The amount")


def test_a_zero_spend_cap_is_allowed_where_zero_means_nothing() -> None:
    assert usd_field(form({"cap": "0"}), "cap", "The cap", allow_zero=True) == 0


@pytest.mark.parametrize(
    ("target", "landing"),
    [
        ("/dashboard/usage?days=7", "/dashboard/usage?days=7"),
        ("/dashboard/", "/dashboard/"),
        (None, "/dashboard/"),
        ("https://evil.example/dashboard", "/dashboard/"),
        ("//evil.example/dashboard", "/dashboard/"),
        ("/dashboard\\@evil.example", "/dashboard/"),
        ("/v1/keys", "/dashboard/"),
        ("javascript:alert(1)", "/dashboard/"),
    ],
)
def test_sign_in_only_returns_to_a_dashboard_page(target: str | None, landing: str) -> None:
    assert safe_next(target) == landing


def test_csrf_tokens_are_bound_to_the_session() -> None:
    one, two = csrf_for_session("sg_sess_one"), csrf_for_session("sg_sess_two")
    assert one != two and len(one) == 64
    assert tokens_match(one, one)
    assert not tokens_match(two, one)
    assert not tokens_match("", one)
    assert not tokens_match(None, one)


def test_the_configure_form_becomes_key_changes() -> None:
    catalog = ["a", "b"]
    changes = key_changes(
        form(
            {
                "name": " prod ",
                "auto_memory": "on",
                "rpm_limit": "1,000",
                "tpm_limit": "",
                "daily_spend_cap_usd": "2.5",
                "restrict_models": "on",
                "allowed_models": ["b"],
            }
        ),
        catalog,
    )
    assert changes == {
        "name": "prod",
        "rpm_limit": 1_000,
        "tpm_limit": None,
        "daily_spend_cap_micros": 2_500_000,
        "allowed_models": ["b"],
        "auto_memory": True,
        "auto_orchestration": False,
    }
    everything = key_changes(form({"restrict_models": "off", "allowed_models": ["a"]}), catalog)
    assert everything["allowed_models"] is None
    with pytest.raises(RequestError, match="No such model"):
        key_changes(form({"restrict_models": "on", "allowed_models": ["zzz"]}), catalog)
    with pytest.raises(RequestError, match="at least one model"):
        key_changes(form({"restrict_models": "on"}), catalog)
    with pytest.raises(RequestError, match="whole number"):
        key_changes(form({"rpm_limit": "1.5"}), catalog)


async def _send(_text: str) -> None:
    await asyncio.sleep(0)


def _connection(state: ConnectionState, **fields: object) -> DeviceConnection:
    device = DeviceConnection(
        device_id="dev_1",
        account_id="acct_1",
        region="",
        slots=2,
        models=frozenset({"m"}),
        send_text=_send,
    )
    device.state = state
    for name, value in fields.items():
        setattr(device, name, value)
    return device


@pytest.mark.parametrize(
    ("connection", "suspended", "state", "detail"),
    [
        (None, None, "offline", ""),
        (_connection(ConnectionState.READY), None, "online", ""),
        (_connection(ConnectionState.BUSY), None, "busy", "every slot is running a job"),
        (
            _connection(ConnectionState.PAUSED, pause_reason="on battery"),
            None,
            "paused",
            "on battery",
        ),
        (
            _connection(ConnectionState.READY, warming=frozenset({"x", "a"})),
            None,
            "warming",
            "loading a, x",
        ),
        (_connection(ConnectionState.CLOSED), None, "offline", ""),
        (_connection(ConnectionState.READY), "canary failed", "suspended", "canary failed"),
    ],
)
def test_device_states_in_a_providers_words(
    connection: DeviceConnection | None, suspended: str | None, state: str, detail: str
) -> None:
    assert describe_state(connection, suspended) == (state, detail)


@pytest.mark.parametrize(
    ("requests", "completed", "shown"),
    [(0, 0, "—"), (4, 4, "100.0%"), (3, 2, "66.6%"), (1_000, 999, "99.9%"), (7, 0, "0.0%")],
)
def test_availability_is_the_share_answered(requests: int, completed: int, shown: str) -> None:
    status = ModelStatus("m", "", "p2p", 0, 0, 0, requests, completed, None)
    assert status.availability == shown
