"""Outgoing webhooks against a real gateway and a real receiver on a local socket."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from sqlalchemy import func, select

from swarmgate.store.tables import webhook_deliveries
from swarmgate.webhooks import ChargeEvent
from swarmgate.webhooks.signing import verify
from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

T = TypeVar("T")


@dataclass(frozen=True)
class Received:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        payload: dict[str, Any] = orjson.loads(self.body)
        return payload


class Receiver:
    """An HTTP server that records every POST; it can be told to fail the next N."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.fail_next = 0
        self.fail_always = False
        self.fail_status = 500
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.received.append(
                        Received(
                            time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body
                        )
                    )
                    failing = receiver.fail_always or receiver.fail_next > 0
                    if receiver.fail_next > 0:
                        receiver.fail_next -= 1
                status = receiver.fail_status if failing else 200
                answer = b"try again later" if failing else b"ok"
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks"

    def of_type(self, event_type: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.headers["swarmgate-event-type"] == event_type]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def webhook_settings(tmp_path: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "webhook_poll_s": 0.05,
        "webhook_backoff_s": 0.1,
        "webhook_timeout_s": 2.0,
        "webhook_max_attempts": 5,
    }
    values.update(overrides)
    return fast_settings(tmp_path, **values)


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(webhook_settings(tmp_path))
    try:
        yield live
    finally:
        await stop_gateway(live)


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        await asyncio.sleep(0.02)


def charge(
    account_id: str,
    job_id: str,
    *,
    cost: int = 1_000,
    available: int = 4_000_000,
    sandbox: bool = False,
) -> ChargeEvent:
    return ChargeEvent(
        account_id=account_id,
        key_id="key_1",
        job_id=job_id,
        model="smollm2-135m-instruct-q4_1",
        prompt_tokens=12,
        completion_tokens=30,
        cost_micros=cost,
        available_micros=available,
        sandbox=sandbox,
    )


async def create_endpoint(
    live: LiveGateway, key: str, url: str, events: list[str], **extra: Any
) -> dict[str, Any]:
    async with live.client(key) as client:
        response = await client.post("/v1/webhooks", json={"url": url, "events": events, **extra})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def deliveries(live: LiveGateway, key: str, endpoint_id: str) -> list[dict[str, Any]]:
    async with live.client(key) as client:
        response = await client.get(f"/v1/webhooks/{endpoint_id}/deliveries")
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def delivery_rows(live: LiveGateway) -> int:
    async with live.gateway.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(webhook_deliveries)) or 0)


# -- endpoints ---------------------------------------------------------------------------
async def test_endpoint_crud_shows_the_secret_once(gw: LiveGateway, receiver: Receiver) -> None:
    _account, key = await gw.developer_key()
    created = await create_endpoint(
        gw, key, receiver.url, ["usage.threshold", "job.completed"], usage_threshold_usd="12.5"
    )
    assert created["id"].startswith("we_")
    assert created["secret"].startswith("whsec_")
    assert created["events"] == ["job.completed", "usage.threshold"]
    assert created["usage_threshold_micros"] == 12_500_000
    assert created["usage_threshold_usd"] == "12.500000"
    assert isinstance(created["created"], int)

    async with gw.client(key) as client:
        listed = (await client.get("/v1/webhooks")).json()
        assert listed["object"] == "list"
        assert [e["id"] for e in listed["data"]] == [created["id"]]
        assert "secret" not in listed["data"][0]
        assert created["secret"] not in (await client.get("/v1/webhooks")).text

        deleted = await client.delete(f"/v1/webhooks/{created['id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {
            "id": created["id"],
            "object": "webhook_endpoint",
            "deleted": True,
        }
        assert (await client.get("/v1/webhooks")).json()["data"] == []
        again = await client.delete(f"/v1/webhooks/{created['id']}")
        assert again.status_code == 404
        gone = await client.get(f"/v1/webhooks/{created['id']}/deliveries")
        assert gone.status_code == 404


async def test_another_accounts_endpoint_is_not_found(gw: LiveGateway, receiver: Receiver) -> None:
    _owner, owner_key = await gw.developer_key("owner")
    _other, other_key = await gw.developer_key("other")
    created = await create_endpoint(gw, owner_key, receiver.url, ["job.completed"])
    async with gw.client(other_key) as client:
        assert (await client.get("/v1/webhooks")).json()["data"] == []
        looked = await client.get(f"/v1/webhooks/{created['id']}/deliveries")
        assert looked.status_code == 404
        assert looked.json()["error"]["code"] == "NOT_FOUND"
        assert (await client.delete(f"/v1/webhooks/{created['id']}")).status_code == 404
    async with gw.client(owner_key) as client:
        assert len((await client.get("/v1/webhooks")).json()["data"]) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "ftp://example.com/x", "events": ["job.completed"]}, "url"),
        ({"url": "https://example.com/x", "events": []}, "events"),
        ({"url": "https://example.com/x", "events": ["job.started"]}, "events"),
        ({"url": "https://example.com/x", "events": ["usage.threshold"]}, "usage_threshold_usd"),
        (
            {
                "url": "https://example.com/x",
                "events": ["usage.threshold"],
                "usage_threshold_usd": "1.0000001",
            },
            "usage_threshold_usd",
        ),
        ({"events": ["job.completed"]}, "url"),
        ({"url": "https://example.com/x", "events": "job.completed"}, "events"),
        ({"url": "https://example.com/x", "events": ["job.completed"], "secret": "x"}, "secret"),
    ],
)
async def test_bad_endpoints_are_refused_naming_the_field(
    gw: LiveGateway, body: dict[str, Any], param: str
) -> None:
    _account, key = await gw.developer_key()
    async with gw.client(key) as client:
        response = await client.post("/v1/webhooks", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_webhooks_need_an_api_key(gw: LiveGateway) -> None:
    async with gw.client() as client:
        assert (await client.get("/v1/webhooks")).status_code == 401
        response = await client.post(
            "/v1/webhooks", json={"url": "https://example.com", "events": ["job.completed"]}
        )
        assert response.status_code == 401


# -- delivery ----------------------------------------------------------------------------
async def test_job_completed_is_signed_and_verifies(gw: LiveGateway, receiver: Receiver) -> None:
    account, key = await gw.developer_key()
    endpoint = await create_endpoint(gw, key, receiver.url, ["job.completed"])
    gw.gateway.webhooks.on_charge(charge(account, "job_abc", cost=1_234, available=4_998_766))

    async def arrived() -> list[Received]:
        return receiver.of_type("job.completed")

    (request,) = await eventually(arrived)
    signature = request.headers["swarmgate-signature"]
    assert abs(verify(endpoint["secret"], request.body, signature) - time.time()) < 60
    event = request.event
    assert event["type"] == "job.completed"
    assert request.headers["swarmgate-event-id"] == event["id"]
    assert request.headers["content-type"] == "application/json"
    assert event["data"] == {
        "account_id": account,
        "job_id": "job_abc",
        "key_id": "key_1",
        "model": "smollm2-135m-instruct-q4_1",
        "sandbox": False,
        "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        "cost_micros": 1_234,
        "cost_usd": "0.001234",
        "available_micros": 4_998_766,
        "available_usd": "4.998766",
    }

    async def logged() -> list[dict[str, Any]]:
        rows = await deliveries(gw, key, endpoint["id"])
        return [r for r in rows if r["status"] == "delivered"]

    (row,) = await eventually(logged)
    assert row["event_id"] == event["id"]
    assert row["attempts"] == 1
    assert row["last_status_code"] == 200
    assert row["last_error"] is None
    assert row["delivered_at"] >= row["created"]
    assert row["next_attempt_at"] is None


async def test_the_same_job_reported_twice_is_delivered_once(
    gw: LiveGateway, receiver: Receiver
) -> None:
    account, key = await gw.developer_key()
    endpoint = await create_endpoint(gw, key, receiver.url, ["job.completed"])
    gw.gateway.webhooks.on_charge(charge(account, "job_twice"))
    gw.gateway.webhooks.on_charge(charge(account, "job_twice"))

    async def delivered() -> list[dict[str, Any]]:
        rows = await deliveries(gw, key, endpoint["id"])
        return [r for r in rows if r["status"] == "delivered"]

    await eventually(delivered)
    await asyncio.sleep(0.3)
    assert len(await deliveries(gw, key, endpoint["id"])) == 1
    assert len(receiver.of_type("job.completed")) == 1


async def test_failures_are_retried_with_backoff_then_delivered(
    gw: LiveGateway, receiver: Receiver
) -> None:
    account, key = await gw.developer_key()
    receiver.fail_next = 2
    endpoint = await create_endpoint(gw, key, receiver.url, ["job.completed"])
    gw.gateway.webhooks.on_charge(charge(account, "job_retry"))

    async def delivered() -> list[dict[str, Any]]:
        rows = await deliveries(gw, key, endpoint["id"])
        return [r for r in rows if r["status"] == "delivered"]

    (row,) = await eventually(delivered)
    assert row["attempts"] == 3
    assert row["last_status_code"] == 200
    attempts = receiver.of_type("job.completed")
    assert len(attempts) == 3
    assert len({a.headers["swarmgate-event-id"] for a in attempts}) == 1
    # backoff 0.1 s, doubled: at least 0.1 s, then 0.2 s between attempts
    first_gap = attempts[1].at - attempts[0].at
    second_gap = attempts[2].at - attempts[1].at
    assert first_gap >= 0.09
    assert second_gap >= 0.19


async def test_gives_up_after_max_attempts_and_logs_failed(
    tmp_path: Path, receiver: Receiver
) -> None:
    live = await start_gateway(webhook_settings(tmp_path, webhook_max_attempts=3))
    try:
        account, key = await live.developer_key()
        receiver.fail_always = True
        receiver.fail_status = 503
        endpoint = await create_endpoint(live, key, receiver.url, ["job.completed"])
        live.gateway.webhooks.on_charge(charge(account, "job_doomed"))

        async def failed() -> list[dict[str, Any]]:
            rows = await deliveries(live, key, endpoint["id"])
            return [r for r in rows if r["status"] == "failed"]

        (row,) = await eventually(failed)
        assert row["attempts"] == 3
        assert row["last_status_code"] == 503
        assert row["last_error"] == "HTTP 503: try again later"
        assert row["next_attempt_at"] is None
        assert row["delivered_at"] is None
        await asyncio.sleep(0.5)
        assert len(receiver.of_type("job.completed")) == 3
    finally:
        await stop_gateway(live)


async def test_an_unreachable_receiver_is_logged(gw: LiveGateway) -> None:
    account, key = await gw.developer_key()
    closed = Receiver()
    url = closed.url
    closed.close()  # nothing listens on this port any more
    endpoint = await create_endpoint(gw, key, url, ["job.completed"])
    gw.gateway.webhooks.on_charge(charge(account, "job_unreachable"))

    async def attempted() -> list[dict[str, Any]]:
        rows = await deliveries(gw, key, endpoint["id"])
        return [r for r in rows if r["attempts"] >= 1]

    (row,) = await eventually(attempted)
    assert row["status"] == "pending"
    assert row["last_status_code"] is None
    assert row["last_error"].startswith("ConnectError")
    assert row["next_attempt_at"] is not None


async def test_deliveries_survive_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    receiver.fail_always = True
    first = await start_gateway(webhook_settings(tmp_path, webhook_max_attempts=100))
    try:
        account, key = await first.developer_key()
        endpoint = await create_endpoint(first, key, receiver.url, ["job.completed"])
        first.gateway.webhooks.on_charge(charge(account, "job_before"))

        async def attempted() -> list[Received]:
            return receiver.of_type("job.completed")

        await eventually(attempted)
        # Reported just before shutdown: still only in memory, written by stop().
        first.gateway.webhooks.on_charge(charge(account, "job_at_shutdown"))
    finally:
        await stop_gateway(first)

    receiver.fail_always = False
    second = await start_gateway(webhook_settings(tmp_path, webhook_max_attempts=100))
    try:
        assert second.gateway.webhooks.has_endpoints(account)

        async def all_delivered() -> list[dict[str, Any]]:
            rows = await deliveries(second, key, endpoint["id"])
            done = [r for r in rows if r["status"] == "delivered"]
            return done if len(done) == 2 else []

        rows = await eventually(all_delivered)
        assert all(r["last_status_code"] == 200 for r in rows)
        delivered_jobs = {
            r.event["data"]["job_id"]
            for r in receiver.of_type("job.completed")
            if r.headers["swarmgate-event-id"] in {row["event_id"] for row in rows}
        }
        assert delivered_jobs == {"job_before", "job_at_shutdown"}
    finally:
        await stop_gateway(second)


async def test_no_rows_for_accounts_without_endpoints(gw: LiveGateway, receiver: Receiver) -> None:
    quiet, _quiet_key = await gw.developer_key("quiet")
    watched, watched_key = await gw.developer_key("watched")
    webhooks = gw.gateway.webhooks
    assert not webhooks.has_endpoints(quiet)
    for n in range(50):
        webhooks.on_charge(charge(quiet, f"job_quiet_{n}", available=10))
    await asyncio.sleep(0.3)
    assert await delivery_rows(gw) == 0

    endpoint = await create_endpoint(gw, watched_key, receiver.url, ["job.completed"])
    assert webhooks.has_endpoints(watched)
    webhooks.on_charge(charge(watched, "job_watched"))
    webhooks.on_charge(charge(quiet, "job_quiet_more"))

    async def delivered() -> list[dict[str, Any]]:
        rows = await deliveries(gw, watched_key, endpoint["id"])
        return [r for r in rows if r["status"] == "delivered"]

    await eventually(delivered)
    assert await delivery_rows(gw) == 1

    async with gw.client(watched_key) as client:
        await client.delete(f"/v1/webhooks/{endpoint['id']}")
    assert not webhooks.has_endpoints(watched)


async def test_balance_low_fires_once_per_crossing(gw: LiveGateway, receiver: Receiver) -> None:
    account, key = await gw.developer_key()
    await create_endpoint(gw, key, receiver.url, ["balance.low"])
    webhooks = gw.gateway.webhooks
    # low_balance_micros is $1
    webhooks.on_charge(charge(account, "job_1", cost=100_000, available=1_500_000))
    webhooks.on_charge(charge(account, "job_2", cost=600_000, available=900_000))  # crosses
    webhooks.on_charge(charge(account, "job_3", cost=100_000, available=800_000))  # still low
    webhooks.on_charge(charge(account, "job_4", cost=100_000, available=2_000_000))  # topped up
    webhooks.on_charge(charge(account, "job_5", cost=1_500_000, available=500_000))  # crosses
    # sandbox money is counted apart: its first charge from $1.10 to $0.10 crosses too
    webhooks.on_charge(charge(account, "job_6", cost=1_000_000, available=100_000, sandbox=True))

    async def three() -> list[Received]:
        found = receiver.of_type("balance.low")
        return found if len(found) >= 3 else []

    events = [r.event for r in await eventually(three)]
    await asyncio.sleep(0.3)
    assert len(receiver.of_type("balance.low")) == 3
    by_job = {e["data"]["job_id"]: e["data"] for e in events}
    assert set(by_job) == {"job_2", "job_5", "job_6"}
    assert by_job["job_2"] == {
        "account_id": account,
        "sandbox": False,
        "job_id": "job_2",
        "available_micros": 900_000,
        "available_usd": "0.900000",
        "threshold_micros": 1_000_000,
        "threshold_usd": "1.000000",
    }
    assert by_job["job_6"]["sandbox"] is True
    assert receiver.of_type("job.completed") == []  # not subscribed


async def test_usage_threshold_fires_once_a_month(gw: LiveGateway, receiver: Receiver) -> None:
    account, key = await gw.developer_key()
    endpoint = await create_endpoint(
        gw, key, receiver.url, ["usage.threshold"], usage_threshold_usd=0.5
    )
    webhooks = gw.gateway.webhooks
    webhooks.on_charge(charge(account, "job_a", cost=300_000))
    webhooks.on_charge(charge(account, "job_b", cost=300_000))  # 0.60 this month: crosses
    webhooks.on_charge(charge(account, "job_c", cost=300_000))

    async def arrived() -> list[Received]:
        return receiver.of_type("usage.threshold")

    (request,) = await eventually(arrived)
    await asyncio.sleep(0.3)
    assert len(receiver.of_type("usage.threshold")) == 1
    data = request.event["data"]
    assert data["endpoint_id"] == endpoint["id"]
    assert data["spend_micros"] == 600_000
    assert data["threshold_micros"] == 500_000
    assert data["month"] == time.strftime("%Y-%m", time.gmtime())
    assert data["sandbox"] is False


async def test_deleting_an_endpoint_fails_what_it_still_owed(
    gw: LiveGateway, receiver: Receiver
) -> None:
    account, key = await gw.developer_key()
    receiver.fail_always = True
    endpoint = await create_endpoint(gw, key, receiver.url, ["job.completed"])
    gw.gateway.webhooks.on_charge(charge(account, "job_owed"))
    await eventually(lambda: _first_attempt(receiver))
    async with gw.client(key) as client:
        assert (await client.delete(f"/v1/webhooks/{endpoint['id']}")).status_code == 200
    async with gw.gateway.engine.connect() as conn:
        row = (await conn.execute(select(webhook_deliveries))).one()
    assert row.status == "failed"
    assert row.last_error == "the endpoint was deleted"


async def _first_attempt(receiver: Receiver) -> list[Received]:
    return receiver.of_type("job.completed")


async def test_an_account_has_at_most_twenty_endpoints(gw: LiveGateway, receiver: Receiver) -> None:
    _account, key = await gw.developer_key()
    for _ in range(20):
        await create_endpoint(gw, key, receiver.url, ["job.completed"])
    async with gw.client(key) as client:
        refused = await client.post(
            "/v1/webhooks", json={"url": receiver.url, "events": ["job.completed"]}
        )
        assert refused.status_code == 400
        assert "at most 20" in refused.json()["error"]["message"]
        first = (await client.get("/v1/webhooks")).json()["data"][0]["id"]
        await client.delete(f"/v1/webhooks/{first}")
        again = await client.post(
            "/v1/webhooks", json={"url": receiver.url, "events": ["job.completed"]}
        )
        assert again.status_code == 201


async def test_a_real_request_raises_job_completed(gw: LiveGateway, receiver: Receiver) -> None:
    await gw.add_sim_device(length=5)
    account, key = await gw.developer_key()
    await create_endpoint(gw, key, receiver.url, ["job.completed"])
    async with gw.client(key) as client:
        answer = await client.post(
            "/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct-q4_1",
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert answer.status_code == 200

    async def arrived() -> list[Received]:
        return receiver.of_type("job.completed")

    (request,) = await eventually(arrived)
    data = request.event["data"]
    assert (data["account_id"], data["job_id"]) == (account, answer.json()["id"])
    assert data["usage"]["completion_tokens"] == 5
    assert b"hi" not in request.body.replace(b"hint", b"")  # no prompt text in events
