"""Prometheus metrics, kept as plain counters and rendered at scrape time.

The request path only adds to dictionaries and bucket arrays (no locks: one event loop);
everything that can be read off the gateway's state — devices by state and model, open
holds — is computed when ``/metrics`` is scraped. Served in the text exposition format
(version 0.0.4).

* ``swarmgate_http_requests_total{route,status}`` and
  ``swarmgate_http_request_duration_seconds{route}`` (to the response's start: the
  headers of a stream, the whole body otherwise), for the inference endpoints.
* ``swarmgate_jobs_total{model,status,inference_type}``, ``swarmgate_job_attempts_total``,
  ``swarmgate_failovers_total{model}`` (jobs that needed more than one attempt),
  ``swarmgate_time_to_first_token_seconds{model}`` and ``swarmgate_job_duration_seconds``.
* ``swarmgate_devices{state,model}``, ``swarmgate_holds_open``,
  ``swarmgate_settled_micros_total`` and ``swarmgate_charges_total``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; what an inference gateway's requests span, from cache-fast to slow models.
BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


@dataclass(slots=True)
class Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}" if pairs else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    def __init__(self) -> None:
        self.http_requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.http_duration: defaultdict[tuple[str], Histogram] = defaultdict(Histogram)
        self.jobs: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.attempts = 0
        self.failovers: defaultdict[tuple[str], int] = defaultdict(int)
        self.ttft: defaultdict[tuple[str], Histogram] = defaultdict(Histogram)
        self.job_duration: defaultdict[tuple[str], Histogram] = defaultdict(Histogram)
        self.settled_micros = 0
        self.charges = 0

    # -- recording (the request path) --------------------------------------------------
    def request(self, route: str, status: int, seconds: float) -> None:
        self.http_requests[(route, str(status))] += 1
        self.http_duration[(route,)].observe(seconds)

    def job(
        self,
        model: str,
        status: str,
        inference_type: str,
        attempts: int,
        ttft_ms: int | None,
        latency_ms: int,
    ) -> None:
        self.jobs[(model, status, inference_type)] += 1
        self.attempts += attempts
        if attempts > 1:
            self.failovers[(model,)] += 1
        if ttft_ms is not None:
            self.ttft[(model,)].observe(ttft_ms / 1000)
        self.job_duration[(model,)].observe(latency_ms / 1000)

    def charged(self, micros: int) -> None:
        self.settled_micros += micros
        self.charges += 1

    # -- rendering (the scrape) ----------------------------------------------------------
    def render(self, devices: Iterable[tuple[str, str, int]], holds_open: int) -> str:
        """``devices``: (state, model, count) rows read off the registry."""
        out: list[str] = []
        self._counter(
            out,
            "swarmgate_http_requests_total",
            "HTTP requests to the inference endpoints, by route and status.",
            ("route", "status"),
            self.http_requests,
        )
        self._histograms(
            out,
            "swarmgate_http_request_duration_seconds",
            "Time to the start of the response.",
            ("route",),
            self.http_duration,
        )
        self._counter(
            out,
            "swarmgate_jobs_total",
            "Finished jobs, by model, status and inference type.",
            ("model", "status", "inference_type"),
            self.jobs,
        )
        out += [
            "# HELP swarmgate_job_attempts_total Attempts made by all jobs (one per device tried).",
            "# TYPE swarmgate_job_attempts_total counter",
            f"swarmgate_job_attempts_total {self.attempts}",
        ]
        self._counter(
            out,
            "swarmgate_failovers_total",
            "Jobs that needed more than one attempt.",
            ("model",),
            self.failovers,
        )
        self._histograms(
            out,
            "swarmgate_time_to_first_token_seconds",
            "From the job's start to its first token.",
            ("model",),
            self.ttft,
        )
        self._histograms(
            out,
            "swarmgate_job_duration_seconds",
            "From the job's start to its end.",
            ("model",),
            self.job_duration,
        )
        out += [
            "# HELP swarmgate_devices Connected devices, by state and model.",
            "# TYPE swarmgate_devices gauge",
        ]
        for state, model, count in devices:
            out.append(f"swarmgate_devices{_labels(('state', 'model'), (state, model))} {count}")
        out += [
            "# HELP swarmgate_holds_open Credit holds of requests still running.",
            "# TYPE swarmgate_holds_open gauge",
            f"swarmgate_holds_open {holds_open}",
            "# HELP swarmgate_settled_micros_total Money charged, in micro-dollars.",
            "# TYPE swarmgate_settled_micros_total counter",
            f"swarmgate_settled_micros_total {self.settled_micros}",
            "# HELP swarmgate_charges_total Charges settled.",
            "# TYPE swarmgate_charges_total counter",
            f"swarmgate_charges_total {self.charges}",
        ]
        return "\n".join(out) + "\n"

    @staticmethod
    def _counter(
        out: list[str],
        name: str,
        help_text: str,
        names: tuple[str, ...],
        values: Mapping[Any, int],
    ) -> None:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        for labels, value in sorted(values.items()):
            out.append(f"{name}{_labels(names, labels)} {value}")

    @staticmethod
    def _histograms(
        out: list[str],
        name: str,
        help_text: str,
        names: tuple[str, ...],
        values: Mapping[Any, Histogram],
    ) -> None:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for labels, histogram in sorted(values.items()):
            cumulative = 0
            for bound, count in zip((*BUCKETS, float("inf")), histogram.counts, strict=True):
                cumulative += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                out.append(f"{name}_bucket{_labels((*names, 'le'), (*labels, le))} {cumulative}")
            base = _labels(names, labels)
            out.append(f"{name}_sum{base} {histogram.total:.6f}")
            out.append(f"{name}_count{base} {histogram.count}")
