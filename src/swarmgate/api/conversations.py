"""``/v1/conversations``: server-side conversation memory (see memory/service.py).

Create a conversation, then pass its id as ``conversation_id`` in chat completions: the
gateway keeps the messages, titles the conversation and summarises its older part, so
a client sends only what is new. Every conversation belongs to one account; another
account's id is answered like an unknown one (404).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.schemas import TextPart, body_schema, parse_body
from swarmgate.errors import ConversationNotFound, ModelNotFound, RequestError
from swarmgate.gateway import Gateway
from swarmgate.memory.store import Conversation, ConversationGone, NewMessage

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])

_MAX_BODY = 4 * 1024 * 1024
_ID = Annotated[str, Field(min_length=1, max_length=64)]


class ConversationMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class NewConversation(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    title: str | None = Field(default=None, min_length=1, max_length=200)
    # The system prompt of this conversation's requests that bring none of their own.
    system: str | None = Field(default=None, max_length=100_000)
    model: str | None = Field(default=None, min_length=1, max_length=200)
    # Earlier messages to start from (an imported chat).
    messages: list[ConversationMessage] | None = Field(default=None, max_length=1000)


class ConversationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    title: str | None = Field(default=None, min_length=1, max_length=200)
    system: str | None = Field(default=None, max_length=100_000)


class AddMessages(BaseModel):
    """One message (``role``, ``content``) or several (``messages``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["user", "assistant"] | None = None
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    messages: list[ConversationMessage] | None = Field(default=None, min_length=1, max_length=1000)

    def all(self) -> list[ConversationMessage]:
        if self.messages is not None:
            if self.role is not None or self.content is not None:
                raise RequestError(
                    "Send either role and content, or messages, not both.", param="messages"
                )
            return self.messages
        if self.role is None or self.content is None:
            param = "role" if self.role is None else "content"
            raise RequestError(f"Missing required parameter: '{param}'.", param=param)
        return [ConversationMessage(role=self.role, content=self.content)]


def _not_found(conversation_id: str) -> ConversationNotFound:
    return ConversationNotFound(f"No conversation '{conversation_id}'.", param="conversation_id")


async def _owned(gateway: Gateway, account_id: str, conversation_id: str) -> Conversation:
    found = await gateway.memory.store.get(account_id, conversation_id)
    if found is None:
        raise _not_found(conversation_id)
    return found


async def _store(
    gateway: Gateway,
    account_id: str,
    conversation: Conversation,
    messages: list[ConversationMessage],
) -> list[int]:
    model = conversation.model
    counter = await gateway.memory.counter(model) if model else gateway.memory.counters.get("")
    texts = [m.text for m in messages]
    counts = await gateway.memory.count(counter, texts)
    new = [
        NewMessage(role=m.role, content=text, tokens=n, counted_by=counter.name)
        for m, text, n in zip(messages, texts, counts, strict=True)
    ]
    try:
        return await gateway.memory.store.append(
            account_id, conversation.id, new, job_id=None, model=None
        )
    except ConversationGone:
        raise _not_found(conversation.id) from None


@router.post(
    "",
    summary="Create a conversation",
    response_model=None,
    openapi_extra=body_schema(NewConversation, required=False),
)
async def create_conversation(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_body(NewConversation, await read_body(request, _MAX_BODY))
    if body.model is not None and gateway.catalog.get(body.model) is None:
        raise ModelNotFound(
            f"The model '{body.model}' does not exist. GET /v1/models lists the models.",
            param="model",
        )
    conversation = await gateway.memory.store.create(
        principal.account_id,
        key_id=principal.key_id,
        title=body.title,
        system=body.system,
        model=body.model,
    )
    if body.messages:
        await _store(gateway, principal.account_id, conversation, body.messages)
        conversation = await _owned(gateway, principal.account_id, conversation.id)
    return json_response(conversation.describe())


@router.get("", summary="List conversations, most recently active first", response_model=None)
async def list_conversations(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> Response:
    try:
        found, more = await gateway.memory.store.page(
            principal.account_id, limit=limit, after=after
        )
    except LookupError:
        raise RequestError(
            f"'after' names no conversation of this account: {after!r}.", param="after"
        ) from None
    data = [c.describe() for c in found]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": more,
        }
    )


@router.get(
    "/{conversation_id}",
    summary="A conversation's messages and current summary",
    response_model=None,
)
async def get_conversation(
    conversation_id: _ID,
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    messages_limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
) -> Response:
    conversation = await _owned(gateway, principal.account_id, conversation_id)
    store = gateway.memory.store
    messages = await store.messages(conversation.id, limit=messages_limit)
    summary = await store.summary(conversation)
    out: dict[str, Any] = conversation.describe()
    out["summary"] = summary.describe() if summary is not None else None
    out["messages"] = [m.describe() for m in messages]
    return json_response(out)


@router.post(
    "/{conversation_id}/messages",
    summary="Add messages to a conversation (no model runs)",
    response_model=None,
    openapi_extra=body_schema(AddMessages),
)
async def add_messages(
    conversation_id: _ID, request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_body(AddMessages, await read_body(request, _MAX_BODY))
    messages = body.all()
    conversation = await _owned(gateway, principal.account_id, conversation_id)
    ids = await _store(gateway, principal.account_id, conversation, messages)
    return json_response(
        {
            "object": "list",
            "conversation_id": conversation.id,
            "data": [
                {
                    "id": f"msg_{i}",
                    "object": "conversation.message",
                    "role": m.role,
                    "content": m.text,
                }
                for i, m in zip(ids, messages, strict=True)
            ],
        }
    )


@router.patch(
    "/{conversation_id}",
    openapi_extra=body_schema(ConversationPatch),
    summary="Rename a conversation or set its system prompt",
    response_model=None,
)
async def update_conversation(
    conversation_id: _ID, request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_body(ConversationPatch, await read_body(request, _MAX_BODY))
    values: dict[str, Any] = {}
    if body.title is not None:
        values.update(title=body.title, title_source="user")
    if "system" in body.model_fields_set:
        values["system"] = body.system
    if not values:
        raise RequestError("Nothing to change: send title or system.")
    updated = await gateway.memory.store.update(principal.account_id, conversation_id, values)
    if updated is None:
        raise _not_found(conversation_id)
    return json_response(updated.describe())


@router.delete(
    "/{conversation_id}", summary="Delete a conversation and its messages", response_model=None
)
async def delete_conversation(
    conversation_id: _ID, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    if not await gateway.memory.store.delete(principal.account_id, conversation_id):
        raise _not_found(conversation_id)
    return json_response({"id": conversation_id, "object": "conversation.deleted", "deleted": True})
