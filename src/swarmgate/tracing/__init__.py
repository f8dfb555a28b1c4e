"""Optional OpenTelemetry tracing: what the rest of the gateway sees of it.

Off unless ``SWARMGATE_OTEL_ENDPOINT`` is set. Off, nothing here touches a request: the
ASGI app is built without the span wrapper, ``Gateway.tracing`` is None, and the hooks in
dispatch and billing are one ``is None`` check each. Of Swarmgate's modules only
``tracing.otel`` imports OpenTelemetry, and only when tracing is on; it needs the ``otel``
extra.

The interfaces below are all the gateway calls, so routing and billing code never names
OpenTelemetry. Spans carry ids, codes, counts and timings, never prompt or answer text,
error messages or keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from starlette.types import ASGIApp

if TYPE_CHECKING:
    from swarmgate.config import GatewaySettings
    from swarmgate.routing.dispatch import AttemptRecord, Execution, JobSpec
    from swarmgate.routing.registry import DeviceConnection

INSTALL_HINT = "pip install 'swarmgate[otel]'"


class TracingUnavailable(RuntimeError):
    """Tracing is configured, but the OpenTelemetry SDK or exporter is not installed."""


class AttemptTrace(Protocol):
    def finish(self, record: AttemptRecord) -> None:
        """The attempt ended as ``record`` says (outcome, error code, first token)."""


class JobTrace(Protocol):
    def attempt(
        self, number: int, device: DeviceConnection, model: str, continuation: bool
    ) -> AttemptTrace: ...

    def finished(self, execution: Execution) -> None:
        """The job reached a final state (succeeded, failed or cancelled)."""


class BillingTrace(Protocol):
    """A credit hold or a settlement, from its start to ``end``."""

    def end(self, error: BaseException | None = None, charged_micros: int | None = None) -> None:
        """It is over: failed with ``error`` if given, else charged ``charged_micros``
        (a settlement)."""


class Tracing(Protocol):
    def server_spans(self, app: ASGIApp, routes: Iterable[str]) -> ASGIApp:
        """``app`` with one server span per HTTP request; ``routes`` are paths served
        outside the router (the hot paths), which are their own route templates."""

    def job(self, spec: JobSpec) -> JobTrace: ...

    def billing(self, operation: str, job_id: str) -> BillingTrace: ...

    async def shutdown(self) -> None:
        """Exports what is still buffered and stops the exporter."""


def tracing_from_settings(settings: GatewaySettings) -> Tracing | None:
    """Tracing as the settings ask: None when off; raises ``TracingUnavailable`` when
    ``SWARMGATE_OTEL_ENDPOINT`` is set and the ``otel`` extra is missing, so that a
    gateway configured to trace refuses to start rather than run blind."""
    if not settings.otel_endpoint:
        return None
    try:
        from swarmgate.tracing.otel import OtelTracing
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        raise TracingUnavailable(
            f"SWARMGATE_OTEL_ENDPOINT is set, but the OpenTelemetry packages are not "
            f"installed ({exc.name} is missing). Install them with {INSTALL_HINT}, or unset "
            "SWARMGATE_OTEL_ENDPOINT to run without tracing."
        ) from exc
    return OtelTracing.exporting_to(
        settings.otel_endpoint,
        service_name=settings.otel_service_name,
        sample_ratio=settings.otel_sample_ratio,
    )
