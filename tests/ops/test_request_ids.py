"""Every response carries ``x-request-id``; log lines written meanwhile carry it too."""

from __future__ import annotations

import logging
import re

import pytest

from swarmgate.logs import JSONFormatter, KeyValueFormatter
from tests.conftest import MODEL, LiveGateway


async def test_ids_are_made_or_echoed(live: LiveGateway, caplog: pytest.LogCaptureFixture) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        made = await client.get("/healthz")
        assert re.fullmatch(r"[0-9a-f]{24}", made.headers["x-request-id"])
        echoed = await client.get("/healthz", headers={"X-Request-ID": "trace-42.a:b"})
        assert echoed.headers["x-request-id"] == "trace-42.a:b"
        odd = await client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
        assert re.fullmatch(r"[0-9a-f]{24}", odd.headers["x-request-id"])
        caplog.set_level(logging.INFO, logger="swarmgate")
        failed = await client.post(
            "/v1/chat/completions",
            headers={"X-Request-ID": "req-failing-1"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2},
        )
        assert failed.status_code == 400 and failed.headers["x-request-id"] == "req-failing-1"
        streamed = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        assert streamed.headers["x-request-id"]


def test_log_lines_carry_the_request_id() -> None:
    from swarmgate.logs import request_id

    record = logging.LogRecord("swarmgate.test", logging.INFO, __file__, 1, "hello", (), None)
    token = request_id.set("rid-7")
    try:
        assert "request_id=rid-7" in KeyValueFormatter("%(message)s").format(record)
        assert '"request_id":"rid-7"' in JSONFormatter().format(record)
    finally:
        request_id.reset(token)
    assert "request_id" not in KeyValueFormatter("%(message)s").format(record)
