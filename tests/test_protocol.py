"""The device protocol's frame validation and the connection and job state machines."""

from __future__ import annotations

import itertools
import re
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from swarmgate.errors import IllegalTransition
from swarmgate.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Delta,
    Done,
    Heartbeat,
    Hello,
    JobError,
    JobFrame,
    SamplingParams,
    Welcome,
    gateway_frame_adapter,
    node_frame_adapter,
)
from swarmgate.routing.registry import DeviceConnection
from swarmgate.routing.states import (
    ConnectionState,
    JobState,
    check_connection_transition,
    check_job_transition,
)

SHA = "0123456789abcdef" * 4
DEVICE = {"os": "Linux 6.1", "cpu": "x86_64", "ram_mb": 8192}
USAGE = {"prompt_tokens": 10, "completion_tokens": 3}


def hello(**overrides: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "node_version": "1.2.3",
        "device": dict(DEVICE),
    }
    frame.update(overrides)
    return frame


def parse(frame: Any) -> Any:
    """Parses the way the gateway does: from the JSON text of a WebSocket frame."""
    return node_frame_adapter.validate_json(orjson.dumps(frame))


def without(frame: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in frame.items() if k != key}


DELTA = {"type": "delta", "job_id": "job_1.1", "text": "hi"}
DONE = {"type": "done", "job_id": "job_1.1", "finish_reason": "stop", "usage": USAGE}
ERROR = {"type": "error", "job_id": "job_1.1", "code": "OOM", "message": "out of memory"}
BEAT = {"type": "heartbeat", "active_jobs": 0}


# -- valid frames ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("frame", "kind", "checks"),
    [
        (
            hello(),
            Hello,
            {"protocol": 1, "region": "unknown", "slots": 1, "models": []},
        ),
        (
            hello(
                region="eu-west",
                slots=256,
                models=[{"id": "m1", "sha256": SHA}, {"id": "m2", "sha256": None}, {"id": "m3"}],
                device={**DEVICE, "accelerator": "Metal"},
            ),
            Hello,
            {"region": "eu-west", "slots": 256},
        ),
        (hello(protocol=2), Hello, {"protocol": 2}),  # parses; the version check comes later
        (BEAT, Heartbeat, {"active_jobs": 0, "paused": False, "pause_reason": None}),
        (
            {
                **BEAT,
                "active_jobs": 3,
                "paused": True,
                "pause_reason": "on battery",
                "cpu_percent": 97.5,
                "temperature_c": 81.0,
                "battery_percent": 12,
            },
            Heartbeat,
            {"paused": True, "pause_reason": "on battery", "battery_percent": 12.0},
        ),
        (DELTA, Delta, {"job_id": "job_1.1", "text": "hi", "tokens": 1}),
        ({**DELTA, "text": "", "tokens": 0}, Delta, {"text": "", "tokens": 0}),
        ({**DELTA, "text": "héllo 😀", "tokens": 5}, Delta, {"text": "héllo 😀", "tokens": 5}),
        (DONE, Done, {"finish_reason": "stop", "text": None}),
        ({**DONE, "finish_reason": "length", "text": "whole"}, Done, {"text": "whole"}),
        ({**DONE, "finish_reason": "cancelled"}, Done, {"finish_reason": "cancelled"}),
        (ERROR, JobError, {"code": "OOM", "message": "out of memory"}),
        ({**DELTA, "job_id": "j" * 64}, Delta, {"job_id": "j" * 64}),
        (hello(node_version="v" * 50, region="r" * 50), Hello, {"region": "r" * 50}),
        (hello(models=[{"id": f"m{i}"} for i in range(64)]), Hello, {}),
    ],
    ids=[
        "hello-minimal",
        "hello-full",
        "hello-other-version",
        "heartbeat-minimal",
        "heartbeat-full",
        "delta",
        "delta-empty",
        "delta-unicode",
        "done",
        "done-with-text",
        "done-cancelled",
        "error",
        "job-id-at-limit",
        "strings-at-limit",
        "models-at-limit",
    ],
)
def test_valid_node_frames_parse(frame: dict[str, Any], kind: type, checks: dict[str, Any]) -> None:
    parsed = parse(frame)
    assert type(parsed) is kind
    for name, value in checks.items():
        assert getattr(parsed, name) == value, name
    # Frames are values: immutable.
    with pytest.raises(ValidationError):
        setattr(parsed, "type", "other")  # noqa: B010 - the frame's type is not known here


def test_hello_nested_values() -> None:
    parsed = parse(hello(models=[{"id": "m1", "sha256": SHA}], device={**DEVICE, "ram_mb": 0}))
    assert parsed.device.ram_mb == 0
    assert parsed.models[0].id == "m1"
    assert parsed.models[0].sha256 == SHA
    assert parsed.device.accelerator is None


# -- invalid frames ---------------------------------------------------------------------------
INVALID: list[tuple[str, Any, tuple[Any, ...], str]] = [
    # what, frame, where the first error is, the pydantic error type
    # -- not a node frame at all
    ("not-an-object", [hello()], (), "dict_type"),
    ("null", None, (), "dict_type"),
    ("no-type", without(hello(), "type"), (), "union_tag_not_found"),
    ("unknown-type", {"type": "reboot"}, (), "union_tag_invalid"),
    ("type-wrong-case", hello(type="Hello"), (), "union_tag_invalid"),
    ("welcome-is-not-a-node-frame", {"type": "welcome", "device_id": "d"}, (), "union_tag_invalid"),
    ("job-is-not-a-node-frame", {"type": "job", "job_id": "j"}, (), "union_tag_invalid"),
    ("cancel-is-not-a-node-frame", {"type": "cancel", "job_id": "j"}, (), "union_tag_invalid"),
    # -- wrong types
    ("protocol-not-a-number", hello(protocol="one"), ("hello", "protocol"), "int_parsing"),
    ("protocol-fraction", hello(protocol=1.5), ("hello", "protocol"), "int_from_float"),
    ("slots-a-string", hello(slots="many"), ("hello", "slots"), "int_parsing"),
    ("device-a-string", hello(device="laptop"), ("hello", "device"), "model_type"),
    (
        "ram-a-string",
        hello(device={**DEVICE, "ram_mb": "lots"}),
        ("hello", "device", "ram_mb"),
        "int_parsing",
    ),
    ("models-not-a-list", hello(models={"id": "m"}), ("hello", "models"), "list_type"),
    ("model-a-string", hello(models=["m1"]), ("hello", "models", 0), "model_type"),
    ("node-version-a-number", hello(node_version=1), ("hello", "node_version"), "string_type"),
    (
        "active-jobs-fraction",
        {**BEAT, "active_jobs": 0.5},
        ("heartbeat", "active_jobs"),
        "int_from_float",
    ),
    ("paused-a-word", {**BEAT, "paused": "maybe"}, ("heartbeat", "paused"), "bool_parsing"),
    ("cpu-a-word", {**BEAT, "cpu_percent": "hot"}, ("heartbeat", "cpu_percent"), "float_parsing"),
    ("delta-text-a-number", {**DELTA, "text": 5}, ("delta", "text"), "string_type"),
    ("delta-text-null", {**DELTA, "text": None}, ("delta", "text"), "string_type"),
    ("delta-job-id-a-number", {**DELTA, "job_id": 7}, ("delta", "job_id"), "string_type"),
    ("delta-tokens-a-word", {**DELTA, "tokens": "x"}, ("delta", "tokens"), "int_parsing"),
    ("done-usage-a-number", {**DONE, "usage": 3}, ("done", "usage"), "model_type"),
    ("done-text-a-list", {**DONE, "text": ["a"]}, ("done", "text"), "string_type"),
    ("error-message-a-dict", {**ERROR, "message": {}}, ("error", "message"), "string_type"),
    # -- values out of range
    ("negative-slots", hello(slots=-1), ("hello", "slots"), "greater_than_equal"),
    ("zero-slots", hello(slots=0), ("hello", "slots"), "greater_than_equal"),
    ("too-many-slots", hello(slots=257), ("hello", "slots"), "less_than_equal"),
    (
        "negative-ram",
        hello(device={**DEVICE, "ram_mb": -1}),
        ("hello", "device", "ram_mb"),
        "greater_than_equal",
    ),
    (
        "too-many-models",
        hello(models=[{"id": f"m{i}"} for i in range(65)]),
        ("hello", "models"),
        "too_long",
    ),
    (
        "empty-model-id",
        hello(models=[{"id": ""}]),
        ("hello", "models", 0, "id"),
        "string_too_short",
    ),
    (
        "long-node-version",
        hello(node_version="v" * 51),
        ("hello", "node_version"),
        "string_too_long",
    ),
    ("long-region", hello(region="r" * 51), ("hello", "region"), "string_too_long"),
    (
        "long-os",
        hello(device={**DEVICE, "os": "o" * 201}),
        ("hello", "device", "os"),
        "string_too_long",
    ),
    (
        "negative-active-jobs",
        {**BEAT, "active_jobs": -1},
        ("heartbeat", "active_jobs"),
        "greater_than_equal",
    ),
    (
        "long-pause-reason",
        {**BEAT, "pause_reason": "p" * 201},
        ("heartbeat", "pause_reason"),
        "string_too_long",
    ),
    ("negative-tokens", {**DELTA, "tokens": -1}, ("delta", "tokens"), "greater_than_equal"),
    ("long-job-id", {**DELTA, "job_id": "j" * 65}, ("delta", "job_id"), "string_too_long"),
    (
        "bad-finish-reason",
        {**DONE, "finish_reason": "crashed"},
        ("done", "finish_reason"),
        "literal_error",
    ),
    (
        "negative-usage",
        {**DONE, "usage": {**USAGE, "prompt_tokens": -1}},
        ("done", "usage", "prompt_tokens"),
        "greater_than_equal",
    ),
    ("long-error-code", {**ERROR, "code": "C" * 65}, ("error", "code"), "string_too_long"),
    (
        "long-error-message",
        {**ERROR, "message": "m" * 2001},
        ("error", "message"),
        "string_too_long",
    ),
    # -- missing fields
    ("hello-no-protocol", without(hello(), "protocol"), ("hello", "protocol"), "missing"),
    (
        "hello-no-node-version",
        without(hello(), "node_version"),
        ("hello", "node_version"),
        "missing",
    ),
    ("hello-no-device", without(hello(), "device"), ("hello", "device"), "missing"),
    ("device-no-cpu", hello(device=without(DEVICE, "cpu")), ("hello", "device", "cpu"), "missing"),
    ("model-no-id", hello(models=[{"sha256": SHA}]), ("hello", "models", 0, "id"), "missing"),
    ("heartbeat-no-active-jobs", {"type": "heartbeat"}, ("heartbeat", "active_jobs"), "missing"),
    ("delta-no-job-id", without(DELTA, "job_id"), ("delta", "job_id"), "missing"),
    ("delta-no-text", without(DELTA, "text"), ("delta", "text"), "missing"),
    ("done-no-usage", without(DONE, "usage"), ("done", "usage"), "missing"),
    ("done-no-finish-reason", without(DONE, "finish_reason"), ("done", "finish_reason"), "missing"),
    (
        "usage-no-completion-tokens",
        {**DONE, "usage": {"prompt_tokens": 1}},
        ("done", "usage", "completion_tokens"),
        "missing",
    ),
    ("error-no-code", without(ERROR, "code"), ("error", "code"), "missing"),
    ("error-no-message", without(ERROR, "message"), ("error", "message"), "missing"),
    # -- extra fields, at every level
    ("hello-extra", hello(admin=True), ("hello", "admin"), "extra_forbidden"),
    (
        "device-extra",
        hello(device={**DEVICE, "gpu": "x"}),
        ("hello", "device", "gpu"),
        "extra_forbidden",
    ),
    (
        "model-extra",
        hello(models=[{"id": "m", "path": "/etc/passwd"}]),
        ("hello", "models", 0, "path"),
        "extra_forbidden",
    ),
    ("heartbeat-extra", {**BEAT, "load": 1}, ("heartbeat", "load"), "extra_forbidden"),
    ("delta-extra", {**DELTA, "logprobs": []}, ("delta", "logprobs"), "extra_forbidden"),
    ("done-extra", {**DONE, "cost": 0}, ("done", "cost"), "extra_forbidden"),
    (
        "usage-extra",
        {**DONE, "usage": {**USAGE, "total_tokens": 13}},
        ("done", "usage", "total_tokens"),
        "extra_forbidden",
    ),
    ("error-extra", {**ERROR, "trace": "..."}, ("error", "trace"), "extra_forbidden"),
    # -- artifact digests: exactly 64 lowercase hex characters
    (
        "sha-uppercase",
        hello(models=[{"id": "m", "sha256": SHA.upper()}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-short",
        hello(models=[{"id": "m", "sha256": SHA[:63]}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-long",
        hello(models=[{"id": "m", "sha256": SHA + "0"}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-not-hex",
        hello(models=[{"id": "m", "sha256": "g" * 64}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-prefixed",
        hello(models=[{"id": "m", "sha256": "sha256:" + SHA[7:]}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-trailing-newline",
        hello(models=[{"id": "m", "sha256": SHA + "\n"}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-empty",
        hello(models=[{"id": "m", "sha256": ""}]),
        ("hello", "models", 0, "sha256"),
        "string_pattern_mismatch",
    ),
    (
        "sha-a-number",
        hello(models=[{"id": "m", "sha256": 12}]),
        ("hello", "models", 0, "sha256"),
        "string_type",
    ),
]


@pytest.mark.parametrize(
    ("frame", "loc", "error_type"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_node_frames_are_rejected(
    frame: Any, loc: tuple[Any, ...], error_type: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(frame)
    first = caught.value.errors(include_url=False)[0]
    assert (tuple(first["loc"]), first["type"]) == (loc, error_type)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b'{"type": "hello",}', b"\xff\xfe", b"[" * 10_000],
    ids=["empty", "text", "truncated", "trailing-comma", "bad-utf8", "deep"],
)
def test_bytes_that_are_not_json_are_rejected(raw: bytes) -> None:
    with pytest.raises(ValidationError) as caught:
        node_frame_adapter.validate_json(raw)
    assert caught.value.errors(include_url=False)[0]["type"] == "json_invalid"


def test_gateway_frames_round_trip() -> None:
    frames = [
        Welcome(device_id="dev_1", heartbeat_interval_s=5.0, rejected_models=["x"]),
        JobFrame(
            job_id="job_1.1",
            model="m",
            messages=[],
            params=SamplingParams(max_tokens=5, temperature=0.7, top_p=1.0, seed=3),
            stream=True,
        ),
        Cancel(job_id="job_1.1"),
    ]
    for frame in frames:
        assert gateway_frame_adapter.validate_json(frame.model_dump_json()) == frame
    with pytest.raises(ValidationError):
        gateway_frame_adapter.validate_json(orjson.dumps(DELTA))


# -- connection state machine ------------------------------------------------------------------
C = ConnectionState
LEGAL_CONNECTION_EDGES = {
    (C.CONNECTING, C.READY),
    (C.CONNECTING, C.CLOSED),
    (C.READY, C.BUSY),
    (C.READY, C.PAUSED),
    (C.READY, C.DRAINING),
    (C.READY, C.CLOSED),
    (C.BUSY, C.READY),
    (C.BUSY, C.PAUSED),
    (C.BUSY, C.DRAINING),
    (C.BUSY, C.CLOSED),
    (C.PAUSED, C.READY),
    (C.PAUSED, C.BUSY),
    (C.PAUSED, C.DRAINING),
    (C.PAUSED, C.CLOSED),
    (C.DRAINING, C.CLOSED),
}
CONNECTION_PAIRS = list(itertools.product(C, C))


@pytest.mark.parametrize(
    ("current", "target"),
    CONNECTION_PAIRS,
    ids=[f"{a.value}->{b.value}" for a, b in CONNECTION_PAIRS],
)
def test_connection_transitions(current: ConnectionState, target: ConnectionState) -> None:
    if (current, target) in LEGAL_CONNECTION_EDGES or current is target:
        check_connection_transition(current, target)  # staying put is always fine
        return
    with pytest.raises(IllegalTransition) as caught:
        check_connection_transition(current, target)
    assert str(caught.value) == (
        f"device connection cannot go from '{current.value}' to '{target.value}'"
    )


def test_every_live_connection_state_can_close_and_closed_is_final() -> None:
    for state in C:
        if state is not C.CLOSED:
            check_connection_transition(state, C.CLOSED)
    for state in C:
        if state is not C.CLOSED:
            with pytest.raises(IllegalTransition, match="from 'closed'"):
                check_connection_transition(C.CLOSED, state)


async def _noop_send(_text: str) -> None:
    return None


def test_device_connection_keeps_its_state_on_an_illegal_move() -> None:
    device = DeviceConnection(
        device_id="dev_1",
        account_id="acct_1",
        region="local",
        slots=1,
        models=frozenset({"m"}),
        send_text=_noop_send,
    )
    assert device.state is C.CONNECTING
    with pytest.raises(IllegalTransition, match=re.escape("from 'connecting' to 'busy'")):
        device.transition(C.BUSY)
    assert device.state is C.CONNECTING
    device.transition(C.READY)
    device.transition(C.DRAINING)
    with pytest.raises(IllegalTransition, match=re.escape("from 'draining' to 'ready'")):
        device.transition(C.READY)
    device.close("bye")
    assert device.state.value == "closed"
    device.close("again")  # closing twice is a no-op, not an illegal move
    assert device.close_reason == "bye"


# -- job state machine -------------------------------------------------------------------------
J = JobState
LEGAL_JOB_EDGES = {
    (J.PENDING, J.RUNNING),
    (J.PENDING, J.FAILED),
    (J.PENDING, J.CANCELLED),
    (J.RUNNING, J.SUCCEEDED),
    (J.RUNNING, J.FAILED),
    (J.RUNNING, J.CANCELLED),
}
JOB_PAIRS = list(itertools.product(J, J))


@pytest.mark.parametrize(
    ("current", "target"), JOB_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in JOB_PAIRS]
)
def test_job_transitions(current: JobState, target: JobState) -> None:
    if (current, target) in LEGAL_JOB_EDGES:
        check_job_transition(current, target)
        return
    # Unlike connections, a job never "moves" to the state it is in: that is a bug upstream.
    with pytest.raises(IllegalTransition) as caught:
        check_job_transition(current, target)
    assert str(caught.value) == f"job cannot go from '{current.value}' to '{target.value}'"


@pytest.mark.parametrize(
    ("state", "finished"),
    [
        (J.PENDING, False),
        (J.RUNNING, False),
        (J.SUCCEEDED, True),
        (J.FAILED, True),
        (J.CANCELLED, True),
    ],
)
def test_finished_job_states_have_no_way_out(state: JobState, finished: bool) -> None:
    assert state.finished is finished
    exits = [target for target in J if (state, target) in LEGAL_JOB_EDGES]
    assert (exits == []) is finished
