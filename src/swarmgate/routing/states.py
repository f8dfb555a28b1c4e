"""Explicit state machines for device connections and jobs.

connection:  connecting → ready ⇄ busy
                          ready/busy ⇄ paused
                          ready/busy/paused → draining → closed
                          (any) → closed

job:         pending → running → succeeded | failed | cancelled
             pending → failed | cancelled
"""

from __future__ import annotations

import enum

from swarmgate.errors import IllegalTransition


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    BUSY = "busy"
    PAUSED = "paused"
    DRAINING = "draining"
    CLOSED = "closed"


_CONNECTION_EDGES: dict[ConnectionState, frozenset[ConnectionState]] = {
    ConnectionState.CONNECTING: frozenset({ConnectionState.READY, ConnectionState.CLOSED}),
    ConnectionState.READY: frozenset(
        {
            ConnectionState.BUSY,
            ConnectionState.PAUSED,
            ConnectionState.DRAINING,
            ConnectionState.CLOSED,
        }
    ),
    ConnectionState.BUSY: frozenset(
        {
            ConnectionState.READY,
            ConnectionState.PAUSED,
            ConnectionState.DRAINING,
            ConnectionState.CLOSED,
        }
    ),
    ConnectionState.PAUSED: frozenset(
        {
            ConnectionState.READY,
            ConnectionState.BUSY,
            ConnectionState.DRAINING,
            ConnectionState.CLOSED,
        }
    ),
    ConnectionState.DRAINING: frozenset({ConnectionState.CLOSED}),
    ConnectionState.CLOSED: frozenset(),
}


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_JOB_EDGES: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def check_connection_transition(current: ConnectionState, target: ConnectionState) -> None:
    if current is not target and target not in _CONNECTION_EDGES[current]:
        raise IllegalTransition(
            f"device connection cannot go from {current.value!r} to {target.value!r}"
        )


def check_job_transition(current: JobState, target: JobState) -> None:
    if target not in _JOB_EDGES[current]:
        raise IllegalTransition(f"job cannot go from {current.value!r} to {target.value!r}")
