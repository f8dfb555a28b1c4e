"""The device protocol: versioned JSON frames over one WebSocket per device.

A node opens ``/v1/nodes/connect`` with ``Authorization: Bearer <device token>``
and must send ``hello`` first; the gateway answers ``welcome``. After that:

    node → gateway   heartbeat, models, delta, done, error
    gateway → node   job, cancel

Every frame is one JSON object with a ``type``. A frame that is not JSON, has an
unknown type, fails validation or arrives out of order closes that connection
with one of the close codes below and a reason; the gateway and other devices
carry on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

PROTOCOL_VERSION = 1

# WebSocket close codes (4000-4999 are free for applications).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013  # the gateway is busy with other devices' handshakes
CLOSE_BAD_FRAME = 4000  # not JSON, unknown type, or failed validation
CLOSE_UNAUTHORIZED = 4001  # missing or wrong device token
CLOSE_UNSUPPORTED_VERSION = 4002
CLOSE_OUT_OF_ORDER = 4003  # e.g. a job frame before hello, or a delta for no such job
CLOSE_HEARTBEAT_TIMEOUT = 4008
CLOSE_FRAME_TOO_LARGE = 4009
CLOSE_REPLACED = 4010  # the same device connected again


class Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceFacts(Frame):
    os: str = Field(max_length=200)
    cpu: str = Field(max_length=200)
    ram_mb: int = Field(ge=0)
    accelerator: str | None = Field(default=None, max_length=200)


class LoadedModel(Frame):
    id: str = Field(min_length=1, max_length=200)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # Tokens the device's context holds for this model (prompt and answer together);
    # None: as the catalog says.
    context_length: int | None = Field(default=None, ge=1, le=10_000_000)


class Hello(Frame):
    type: Literal["hello"]
    protocol: int
    node_version: str = Field(max_length=50)
    device: DeviceFacts
    region: str = Field(default="unknown", max_length=50)
    # What runs the models ("llama-cpp", "sim", ...): canaries compare with its references.
    engine: str = Field(default="unknown", max_length=50)
    slots: int = Field(default=1, ge=1, le=256)
    models: list[LoadedModel] = Field(default_factory=list, max_length=64)


class WarmingModel(Frame):
    """A model the device is fetching or loading; not servable yet."""

    id: str = Field(min_length=1, max_length=200)
    progress: float | None = Field(default=None, ge=0, le=1)


class Heartbeat(Frame):
    type: Literal["heartbeat"]
    active_jobs: int = Field(ge=0)
    paused: bool = False
    pause_reason: str | None = Field(default=None, max_length=200)
    cpu_percent: float | None = None
    temperature_c: float | None = None
    battery_percent: float | None = None
    warming: list[WarmingModel] = Field(default_factory=list, max_length=64)


class ModelsChanged(Frame):
    """The full set of models the device serves now (e.g. after a download finished)."""

    type: Literal["models"]
    models: list[LoadedModel] = Field(max_length=64)


class Delta(Frame):
    type: Literal["delta"]
    job_id: str = Field(max_length=64)
    text: str
    tokens: int = Field(default=1, ge=0)


class Usage(Frame):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class Done(Frame):
    type: Literal["done"]
    job_id: str = Field(max_length=64)
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    # Non-streamed jobs return the whole text here instead of deltas.
    text: str | None = None


class JobError(Frame):
    type: Literal["error"]
    job_id: str = Field(max_length=64)
    code: str = Field(max_length=64)
    message: str = Field(max_length=2000)


NodeFrameType = Hello | Heartbeat | ModelsChanged | Delta | Done | JobError
NodeFrame = Annotated[NodeFrameType, Field(discriminator="type")]
node_frame_adapter: TypeAdapter[NodeFrameType] = TypeAdapter(NodeFrame)


class Welcome(Frame):
    type: Literal["welcome"] = "welcome"
    protocol: int = PROTOCOL_VERSION
    device_id: str
    heartbeat_interval_s: float
    # Announced models the gateway will not route to (unknown id or artifact mismatch).
    rejected_models: list[str] = Field(default_factory=list)


class ChatMessage(Frame):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingParams(Frame):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(ge=0, le=1)
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = None


class JobFrame(Frame):
    type: Literal["job"] = "job"
    job_id: str
    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    stream: bool
    # The last message is a partial assistant answer to continue (another device was
    # cut off mid-stream); ``params.max_tokens`` counts only the new tokens.
    continue_final: bool = False

    @model_validator(mode="after")
    def _continues_an_assistant_turn(self) -> JobFrame:
        if self.continue_final and (not self.messages or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final needs a last message with role 'assistant'")
        return self


class Cancel(Frame):
    type: Literal["cancel"] = "cancel"
    job_id: str


GatewayFrame = Annotated[Welcome | JobFrame | Cancel, Field(discriminator="type")]
gateway_frame_adapter: TypeAdapter[Welcome | JobFrame | Cancel] = TypeAdapter(GatewayFrame)
