"""Dispatch and failover against scripted in-memory devices: no sockets, exact outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson
import pytest

from swarmgate.errors import AllAttemptsFailed, DevicesBusy
from swarmgate.protocol import ChatMessage, Delta, Done, JobError, SamplingParams, Usage
from swarmgate.routing.dispatch import DispatchPolicy, Execution, JobSpec
from swarmgate.routing.profile import MEASURED_AFTER
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
from swarmgate.routing.states import ConnectionState

Script = Callable[[str], list[Delta | Done | JobError]]


def answer(text: str) -> Script:
    def run(job_id: str) -> list[Delta | Done | JobError]:
        return [
            Delta(type="delta", job_id=job_id, text=text),
            Done(
                type="done",
                job_id=job_id,
                finish_reason="stop",
                usage=Usage(prompt_tokens=2, completion_tokens=1),
            ),
        ]

    return run


def error(code: str) -> Script:
    return lambda job_id: [JobError(type="error", job_id=job_id, code=code, message=code)]


async def _noop(_text: str) -> None:
    return None


class ScriptedDevice:
    """A device connection whose node answers every job from a script."""

    def __init__(self, registry: DeviceRegistry, name: str, script: Script, ttft: float) -> None:
        self.conn = DeviceConnection(
            device_id=name,
            account_id="p",
            region="r",
            slots=1,
            models=frozenset({"m"}),
            send_text=_noop,
        )
        stats = self.conn.profile.model_stats("m")
        stats.ttft_ms = ttft  # fixes the order in which devices are tried
        stats.samples = MEASURED_AFTER  # measured: no exploration share
        self.conn.transition(ConnectionState.READY)
        registry.add(self.conn)
        self.script = script
        self.jobs = 0
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            text = await self.conn.outbox.get()
            if text is None:
                return
            frame = orjson.loads(text)
            if frame["type"] != "job":
                continue
            self.jobs += 1
            channel = self.conn.active[frame["job_id"]]
            for event in self.script(frame["job_id"]):
                channel.put_nowait(event)


def spec() -> JobSpec:
    return JobSpec(
        job_id="job",
        account_id="a",
        key_id=None,
        kind="chat",
        model="m",
        messages=(ChatMessage(role="user", content="hi"),),
        params=SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9),
        stream=False,
    )


POLICY = DispatchPolicy(retry_backoff_s=0.001, queue_wait_s=0.05, first_token_timeout_s=0.5)


async def run(*scripts: Script) -> tuple[Execution, list[ScriptedDevice]]:
    registry = DeviceRegistry()
    devices = [ScriptedDevice(registry, f"d{i}", s, ttft=i) for i, s in enumerate(scripts)]
    execution = Execution(spec=spec(), registry=registry, policy=POLICY)
    try:
        await execution.complete()
    finally:
        for device in devices:
            device.task.cancel()
    return execution, devices


async def test_refusals_fail_over_without_cooling_the_device_down() -> None:
    execution, devices = await run(error("DEVICE_PAUSED"), answer("ok"))
    assert [a.outcome for a in execution.attempts] == ["refused", "succeeded"]
    assert devices[0].conn.profile.consecutive_failures == 0
    assert devices[0].conn.profile.cooldown_until == 0
    assert execution.completion is not None and execution.completion.text == "ok"


async def test_errors_fail_over_and_cool_the_device_down() -> None:
    execution, devices = await run(error("SIM_FAILURE"), answer("ok"))
    assert [a.outcome for a in execution.attempts] == ["failed", "succeeded"]
    assert devices[0].conn.profile.consecutive_failures == 1
    assert devices[0].conn.profile.cooldown_until > 0


@pytest.mark.parametrize(
    ("scripts", "error_type", "code"),
    [
        ((error("DEVICE_PAUSED"), error("NODE_STOPPING")), DevicesBusy, "DEVICES_BUSY"),
        ((error("DEVICE_PAUSED"), error("SIM_FAILURE")), AllAttemptsFailed, "ALL_ATTEMPTS_FAILED"),
    ],
)
async def test_when_every_device_declines_or_fails(
    scripts: tuple[Script, ...], error_type: type[Exception], code: str
) -> None:
    with pytest.raises(error_type) as caught:
        await run(*scripts)
    assert caught.value.code == code  # type: ignore[attr-defined]


async def test_retries_stop_at_the_retry_limit() -> None:
    registry = DeviceRegistry()
    devices = [ScriptedDevice(registry, f"d{i}", error("SIM_FAILURE"), ttft=i) for i in range(9)]
    execution = Execution(spec=spec(), registry=registry, policy=POLICY)
    try:
        with pytest.raises(AllAttemptsFailed):
            await execution.complete()
    finally:
        for device in devices:
            device.task.cancel()
    # One first try plus max_retries (5) retries, each on a different device.
    assert [d.jobs for d in devices] == [1] * 6 + [0] * 3
    assert len({a.device_id for a in execution.attempts}) == POLICY.max_retries + 1
