"""``/metrics``: Prometheus text with requests, jobs, failovers, devices, holds and money."""

from __future__ import annotations

import re
from pathlib import Path

from swarmgate.metrics import BUCKETS, Histogram, Metrics
from tests.billing.test_request_billing import priced_catalog
from tests.conftest import MODEL, fast_settings, start_gateway, stop_gateway


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample line (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if line.split("{")[0].split(" ")[0] == name and found == labels:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_histograms_are_cumulative_with_inf() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.005, 0.2, 100.0, 1000.0):
        metrics.request("/v1/chat/completions", 200, seconds)
    text = metrics.render([], 0)
    name = "swarmgate_http_request_duration_seconds"
    assert sample(text, name + "_bucket", route="/v1/chat/completions", le="0.005") == 2
    assert sample(text, name + "_bucket", route="/v1/chat/completions", le="0.25") == 3
    assert sample(text, name + "_bucket", route="/v1/chat/completions", le="+Inf") == 5
    assert sample(text, name + "_count", route="/v1/chat/completions") == 5
    assert len(Histogram().counts) == len(BUCKETS) + 1


async def test_metrics_follow_requests_jobs_failovers_and_money(tmp_path: Path) -> None:
    live = await start_gateway(fast_settings(tmp_path, catalog_path=priced_catalog(tmp_path)))
    try:
        await live.add_sim_device(fail_rate=1.0)
        await live.add_sim_device()
        _, key = await live.developer_key()
        async with live.client(key) as client:
            for _ in range(4):
                ok = await client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                )
                assert ok.status_code == 200
            missing = await client.post(
                "/v1/chat/completions",
                json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            )
            assert missing.status_code == 404
            await live.gateway.billing.writer.posted()
            scraped = await client.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = scraped.text
        route = "/v1/chat/completions"
        assert sample(text, "swarmgate_http_requests_total", route=route, status="200") == 4
        assert sample(text, "swarmgate_http_requests_total", route=route, status="404") == 1
        assert (
            sample(
                text, "swarmgate_jobs_total", model=MODEL, status="completed", inference_type="p2p"
            )
            == 4
        )
        attempts = sample(text, "swarmgate_job_attempts_total")
        failovers = sample(text, "swarmgate_failovers_total", model=MODEL)
        assert attempts >= 4 and attempts - 4 >= failovers  # each failover is one more try
        assert sample(text, "swarmgate_time_to_first_token_seconds_count", model=MODEL) == 4
        assert sample(text, "swarmgate_devices", state="ready", model=MODEL) == 2
        assert sample(text, "swarmgate_holds_open") == 0
        assert sample(text, "swarmgate_charges_total") == 4
        assert sample(text, "swarmgate_settled_micros_total") > 0
        assert "hi" not in re.sub(r"#.*", "", text).split()  # no request text in metrics
    finally:
        await stop_gateway(live)
