"""Request bodies of the public API, validated once, with errors that name the field."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from swarmgate.errors import RequestError

ModelT = TypeVar("ModelT", bound=BaseModel)

# Fields the OpenAI SDKs and chat front ends send that we accept and do not act on.
# Strict types: "yes" is not a boolean and "0.5" is not a number, as with OpenAI.
_LENIENT = ConfigDict(extra="ignore", strict=True, str_max_length=1_000_000)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"only text content parts are supported, not {value!r}")
        return value


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(max_length=64)
    arguments: str = Field(default="", max_length=100_000)


class ToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant turn that called tools.
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=128)

    @property
    def text(self) -> str:
        """The message as text for a model. Devices speak plain chat, so tool calls and
        tool results are written out in words."""
        if self.content is None:
            body = ""
        elif isinstance(self.content, str):
            body = self.content
        else:
            body = "\n".join(part.text for part in self.content)
        if self.tool_calls:
            calls = "; ".join(f"{c.function.name}({c.function.arguments})" for c in self.tool_calls)
            body = f"{body}\n[called {calls}]".strip()
        if self.role == "tool":
            body = f"[result of tool call {self.tool_call_id or ''}]\n{body}"
        return body

    @property
    def chat_role(self) -> Literal["system", "user", "assistant"]:
        if self.role == "tool":
            return "user"
        return "system" if self.role == "developer" else self.role


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


def content_or_calls(messages: list[Message]) -> list[Message]:
    """Only an assistant turn that called tools may come without content (one pass over
    the list per request, not a validator call per message)."""
    for index, message in enumerate(messages):
        if message.content is None and not (message.role == "assistant" and message.tool_calls):
            raise ValueError(
                f"messages[{index}].content may be null only in an assistant message with "
                "tool_calls"
            )
    return messages


class MaxPrice(BaseModel):
    """The most a request will pay, per one million tokens, in micro-dollars."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input_per_1m_micros: int = Field(default=10**12, ge=0)
    output_per_1m_micros: int = Field(default=10**12, ge=0)


class RoutingFields(BaseModel):
    """Routing controls any inference request may carry (see routing/choice.py)."""

    model_config = _LENIENT

    tier: Literal["cheapest", "balanced", "fastest"] = "balanced"
    privacy_mode: bool = False  # never any cloud upstream
    trusted_only: bool = False
    max_latency_ms: int | None = Field(default=None, ge=1)
    fallback_models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=8
    )
    allow_hosters: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=256
    )
    deny_hosters: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, max_length=4096
    )
    privacy_level: Literal["standard", "verified"] | None = None
    # The Nataris spelling of privacy_level.
    privacyLevel: Literal["standard", "verified"] | None = None
    max_price: MaxPrice | None = None
    # Continue a stream on another device if its device fails mid-answer.
    stream_continuation: bool = True

    @property
    def verified_only(self) -> bool:
        return "verified" in (self.privacy_level, self.privacyLevel)


class Orchestration(BaseModel):
    """Run the request as a multi-step workflow (workflows/)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = True
    workflow: str = Field(default="auto", min_length=1, max_length=32)
    max_steps: int = Field(default=10, ge=1, le=100)
    # A budget cap in US dollars, as the seeds take it; turned into integer micro-dollars
    # once (``max_cost_micros``), rounding down. Or give micro-dollars directly.
    max_cost_usd: float | int | None = Field(default=None, gt=0, le=1_000_000)
    max_cost_micros_: int | None = Field(default=None, alias="max_cost_micros", gt=0, le=10**12)

    @property
    def max_cost_micros(self) -> int | None:
        if self.max_cost_micros_ is not None:
            return self.max_cost_micros_
        if self.max_cost_usd is None:
            return None
        return int(Decimal(str(self.max_cost_usd)) * 1_000_000)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = Field(default="", max_length=4000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDef(BaseModel):
    """An OpenAI function tool the client offers (used by the ``agent`` workflow)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    function: FunctionDef


class ChatCompletionRequest(RoutingFields):
    model_config = _LENIENT

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1, max_length=10_000)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    n: int | None = None
    # Conversation memory: the stored conversation this request continues.
    conversation_id: str | None = Field(default=None, min_length=1, max_length=64)
    orchestration: Orchestration | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=128)

    @field_validator("messages")
    @classmethod
    def _contents(cls, value: list[Message]) -> list[Message]:
        return content_or_calls(value)

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n=1 is supported: each request runs on one device")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class InferenceRequest(RoutingFields):
    model_config = _LENIENT

    model: str = Field(min_length=1, max_length=200)
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=100, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, ge=0, le=1)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None
    stream: bool = False


class JobRequest(RoutingFields):
    """An asynchronous job: a prompt or a chat, run in the background."""

    model_config = _LENIENT

    model: str = Field(min_length=1, max_length=200)
    prompt: str | None = Field(default=None, min_length=1)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=10_000)
    max_tokens: int = Field(default=256, ge=1)

    @field_validator("messages")
    @classmethod
    def _contents(cls, value: list[Message] | None) -> list[Message] | None:
        return None if value is None else content_or_calls(value)

    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, ge=0, le=1)
    stop: list[str] | None = Field(default=None, max_length=4)
    seed: int | None = None


def body_schema(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for an endpoint that reads and validates its body itself (with
    ``parse_body``), so the OpenAPI document still shows the body's schema."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _param_of(loc: tuple[int | str, ...]) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[TextPart]", "function-after[_stop_list(), ...]"):
            continue  # union branch names pydantic adds; not a field
        else:
            path += f".{part}" if path else str(part)
    return path or None


def parse_optional_body(model: type[ModelT], body: bytes) -> ModelT:
    """For endpoints whose body may be left out: no body at all takes the model's
    defaults; anything sent, whitespace alone included, must be a valid JSON object."""
    return parse_body(model, body) if body else model()


def parse_body(model: type[ModelT], body: bytes) -> ModelT:
    """Validates a JSON body; any problem becomes a 400 that names the offending param."""
    if not body.strip():
        raise RequestError("The request body is empty; send a JSON object.")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # For a union (content: str | list of parts) the deepest error is the telling one.
        first = max(errors, key=lambda e: len(_param_of(tuple(e["loc"])) or ""))
        if first["type"] == "json_invalid":
            raise RequestError(f"Malformed JSON body: {first['msg']}.") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise RequestError("The request body must be a JSON object.") from None
        param = _param_of(tuple(first["loc"]))
        message = first["msg"]
        if first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param:
            message = f"Invalid value for '{param}': {message}."
        raise RequestError(message, param=param) from None
