"""What each operation answers on success, as JSON Schemas for the OpenAPI document.

The routes build their bodies by hand (dicts rendered with orjson), so FastAPI cannot
infer them. The schemas here are written from the handlers and the services they call,
field by field: which keys are always there, which may be null, which appear only
sometimes; ``openapi.SUCCESS`` says which operation answers with which. Objects are
left open (no ``additionalProperties: false``) so that a field added later does not
break a client that validates answers.

Money is integer micro-dollars (``*_micros``). Its display companions (``*_usd``) are
decimal strings with six places (``"12.345678"``), except in ``/v1/usage`` and
``/v1/workflows``, which send them as JSON numbers.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
NULL: Schema = {"type": "null"}
TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
UNIX_SECONDS: Schema = {"type": "integer", "description": "Unix seconds"}
MICROS: Schema = {"type": "integer", "description": "micro-dollars"}
USD_TEXT: Schema = {
    "type": "string",
    "pattern": r"^-?[0-9]+\.[0-9]{6}$",
    "description": "dollars, six decimal places, made from the micro-dollar integer",
}
USD_NUMBER: Schema = {"type": "number", "description": "dollars, for display"}
STRINGS: Schema = {"type": "array", "items": STRING}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or null."""
    kind = schema.get("type")
    if not isinstance(kind, str):
        return {"anyOf": [schema, NULL]}
    out = {**schema, "type": [kind, "null"]}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def const(value: str) -> Schema:
    return {"type": "string", "const": value}


def one_of(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def map_of(values: Schema, description: str) -> Schema:
    """An object whose keys are data (model ids), each value shaped by ``values``."""
    return {"type": "object", "additionalProperties": values, "description": description}


def obj(
    required: dict[str, Schema],
    optional: dict[str, Schema] | None = None,
    *,
    description: str | None = None,
) -> Schema:
    """An open object: every key of ``required`` is always sent, ``optional`` ones may be."""
    out: Schema = {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }
    if description is not None:
        out["description"] = description
    return out


def extends(
    base: str, required: dict[str, Schema], optional: dict[str, Schema] | None = None
) -> Schema:
    """``base``'s fields and these."""
    return {"allOf": [ref(base), obj(required, optional)]}


def list_of(item: Schema, description: str | None = None) -> Schema:
    return obj({"object": const("list"), "data": array(item)}, description=description)


# -- shared pieces ----------------------------------------------------------------------
_TOKENS = obj(
    {"prompt_tokens": INTEGER, "completion_tokens": INTEGER, "total_tokens": INTEGER},
    description="Tokens counted for the request",
)
_PRICING = obj(
    {"input_per_1m_micros": INTEGER, "output_per_1m_micros": INTEGER},
    description="Micro-dollars per one million tokens",
)
_MONEY_TOTALS = obj(
    {"jobs": INTEGER, "tokens": INTEGER, "earned_micros": MICROS, "earned_usd": USD_TEXT},
    description="Jobs served, tokens and what they earned",
)
_FUNDS = obj(
    {
        "balance_micros": MICROS,
        "balance_usd": USD_TEXT,
        "withdrawable_micros": MICROS,
        "withdrawable_usd": USD_TEXT,
        "pending_payouts_micros": MICROS,
        "pending_payouts_usd": USD_TEXT,
        "paid_out_micros": MICROS,
        "paid_out_usd": USD_TEXT,
        "welcome_bonus": nullable(
            obj(
                {
                    "amount_micros": MICROS,
                    "amount_usd": USD_TEXT,
                    "locked_micros": MICROS,
                    "locked_usd": USD_TEXT,
                    "unlocks_at": nullable(TIMESTAMP),
                },
                description="null when the account was granted no welcome bonus",
            )
        ),
    },
    description="A provider account's balance, what of it may be withdrawn, and payouts",
)
_MODEL_STATS = obj(
    {
        "ttft_ms": nullable(NUMBER),
        "tokens_per_s": nullable(NUMBER),
        "success_rate": NUMBER,
        "samples": INTEGER,
    },
    description="Decaying averages of what a device did serving one model",
)

# -- inference ------------------------------------------------------------------------
_DEVICE_RUN = obj(
    {
        "inference_type": {"type": "string", "description": "p2p (a device) or cloud"},
        "device_id": nullable(STRING),
        "model": nullable(STRING),
        "attempts": INTEGER,
        "latency_ms": INTEGER,
        "ttft_ms": nullable(INTEGER),
    },
    {
        "upstream": nullable(STRING),
        "byok": BOOLEAN,
        "continued": array(obj({"device_id": STRING, "completion_tokens": INTEGER})),
        "conversation_id": STRING,
    },
    description="How a job ran: on which device or upstream, after how many attempts",
)
_ORCHESTRATED_RUN = obj(
    {
        "inference_type": const("orchestrated"),
        "workflow": obj(
            {
                "id": STRING,
                "type": STRING,
                "requested": STRING,
                "status": STRING,
                "stop_reason": nullable(STRING),
                "steps_executed": INTEGER,
                "total_cost_micros": MICROS,
                "total_cost_usd": USD_NUMBER,
            }
        ),
    },
    {"conversation_id": STRING},
    description="An orchestrated request's workflow run",
)
_TOOL_CALL = obj(
    {
        "id": STRING,
        "type": const("function"),
        "function": obj({"name": STRING, "arguments": STRING}),
    }
)
_FINISH_REASON: Schema = {
    "type": "string",
    "description": "stop, length, cancelled, or tool_calls (orchestration)",
}
_CHAT_COMPLETION = obj(
    {
        "id": STRING,
        "object": const("chat.completion"),
        "created": UNIX_SECONDS,
        "model": STRING,
        "choices": array(
            obj(
                {
                    "index": INTEGER,
                    "message": obj(
                        {"role": const("assistant"), "content": nullable(STRING)},
                        {"tool_calls": array(ref("AssistantToolCall"))},
                    ),
                    "logprobs": NULL,
                    "finish_reason": _FINISH_REASON,
                }
            )
        ),
        "usage": ref("TokenUsage"),
        "system_fingerprint": NULL,
        "swarmgate": {"anyOf": [ref("DeviceRun"), ref("OrchestratedRun")]},
    }
)
_CHAT_CHUNK = obj(
    {
        "id": STRING,
        "object": const("chat.completion.chunk"),
        "created": UNIX_SECONDS,
        "model": STRING,
        "system_fingerprint": NULL,
        "choices": array(
            obj(
                {
                    "index": INTEGER,
                    "delta": obj(
                        {},
                        {
                            "role": const("assistant"),
                            "content": STRING,
                            "tool_calls": array(
                                extends("AssistantToolCall", {"index": INTEGER}),
                            ),
                        },
                    ),
                    "logprobs": NULL,
                    "finish_reason": nullable(_FINISH_REASON),
                }
            )
        ),
    },
    {
        # Present, null, on every chunk when stream_options.include_usage is set; the
        # last chunk before [DONE] then has no choices and carries the usage.
        "usage": nullable(ref("TokenUsage")),
        "swarmgate": {
            "anyOf": [
                ref("DeviceRun"),
                ref("OrchestratedRun"),
                obj({"workflow_id": STRING, "workflow": STRING}),
                obj({"workflow_step": ref("WorkflowStep")}),
            ]
        },
    },
    description="One server-sent event of a streamed chat completion",
)
_INFERENCE_PROVIDER = obj({"region": nullable(STRING), "latency_ms": INTEGER})
_INFERENCE = obj(
    {
        "id": STRING,
        "object": const("inference"),
        "created": UNIX_SECONDS,
        "model": STRING,
        "output": STRING,
        "finish_reason": _FINISH_REASON,
        "usage": ref("TokenUsage"),
        "provider": _INFERENCE_PROVIDER,
        "swarmgate": ref("DeviceRun"),
    }
)
_INFERENCE_CHUNK = obj(
    {"id": STRING, "object": const("inference.chunk"), "output": STRING},
    {
        "finish_reason": _FINISH_REASON,
        "usage": ref("TokenUsage"),
        "provider": _INFERENCE_PROVIDER,
        "swarmgate": ref("DeviceRun"),
    },
    description="One server-sent event of a streamed inference; the last has the usage",
)
_QUEUED_JOB = obj(
    {
        "id": STRING,
        "object": const("job"),
        "status": const("queued"),
        "model": STRING,
        "created": UNIX_SECONDS,
    }
)
_JOB = obj(
    {
        "id": STRING,
        "object": const("job"),
        "kind": STRING,
        "status": {
            "type": "string",
            "description": "queued, running, completed, failed or cancelled",
        },
        "model": STRING,
        "created": UNIX_SECONDS,
        "started_at": nullable(TIMESTAMP),
        "completed_at": nullable(TIMESTAMP),
        "device_id": nullable(STRING),
        "latency_ms": nullable(INTEGER),
        "result": nullable(
            obj(
                {
                    "output": nullable(STRING),
                    "finish_reason": nullable(STRING),
                    "usage": obj(
                        {
                            "prompt_tokens": nullable(INTEGER),
                            "completion_tokens": nullable(INTEGER),
                            "total_tokens": INTEGER,
                        }
                    ),
                },
                description="Set once the job has completed",
            )
        ),
        "error": nullable(
            obj(
                {"code": nullable(STRING), "message": nullable(STRING)},
                description="Set when the job has failed",
            )
        ),
        "attempts": array(
            obj(
                {
                    "attempt": INTEGER,
                    "device_id": STRING,
                    "outcome": STRING,
                    "error_code": nullable(STRING),
                    "first_token_ms": nullable(INTEGER),
                    "duration_ms": INTEGER,
                }
            )
        ),
    }
)

# -- models ---------------------------------------------------------------------------
_MODEL = obj(
    {
        "id": STRING,
        "object": const("model"),
        "created": UNIX_SECONDS,
        "owned_by": STRING,
        "type": STRING,
        "description": STRING,
        "available": BOOLEAN,
        "devices": INTEGER,
        "cloud": BOOLEAN,
        "tier": one_of("p2p", "cloud", "hybrid"),
        "context_length": INTEGER,
        "pricing": obj(
            {
                "input_per_1m_micros": MICROS,
                "output_per_1m_micros": MICROS,
                "input_per_1m_usd": USD_TEXT,
                "output_per_1m_usd": USD_TEXT,
            }
        ),
    }
)
_NODE_MODEL = obj(
    {
        "id": STRING,
        "context_length": INTEGER,
        "artifact": nullable(
            obj(
                {
                    "filename": STRING,
                    "url": nullable(STRING),
                    "sha256": nullable(STRING),
                    "size_bytes": nullable(INTEGER),
                }
            )
        ),
    }
)

# -- accounts, sessions and keys --------------------------------------------------------
_ACCOUNT = obj(
    {
        "id": STRING,
        "object": const("account"),
        "email": nullable(STRING),
        "name": STRING,
        "roles": array(one_of("developer", "provider")),
        "created": UNIX_SECONDS,
    }
)
_SESSION = obj(
    {
        "object": const("session"),
        "id": STRING,
        "account_id": STRING,
        "token": STRING,
        "expires_at": TIMESTAMP,
    }
)
_KEY_SETTINGS = obj(
    {
        "rpm_limit": nullable(INTEGER),
        "tpm_limit": nullable(INTEGER),
        "daily_spend_cap_micros": nullable(MICROS),
        "daily_spend_cap_usd": nullable(USD_TEXT),
        "allowed_models": nullable(STRINGS),
        "auto_memory": BOOLEAN,
        "auto_orchestration": BOOLEAN,
    },
    description="null limits are no limit; null allowed_models is every model",
)
_API_KEY = obj(
    {
        "id": STRING,
        "object": const("api_key"),
        "name": STRING,
        "prefix": STRING,
        "mode": one_of("live", "test"),
        "status": one_of("active", "expired", "revoked"),
        "created": UNIX_SECONDS,
        "last_used_at": nullable(TIMESTAMP),
        "expires_at": nullable(TIMESTAMP),
        "revoked_at": nullable(TIMESTAMP),
        "settings": ref("KeySettings"),
    },
    description="An API key as its owner sees it; never the secret",
)
_ADMIN_ACCOUNT = obj(
    {
        "id": STRING,
        "name": STRING,
        "email": nullable(STRING),
        "developer": BOOLEAN,
        "provider": BOOLEAN,
        "credit_micros": {"type": "integer", "description": "the credit granted at creation"},
        "created_at": TIMESTAMP,
    }
)
_LIVE_DEVICE = obj(
    {
        "id": STRING,
        "account_id": STRING,
        "state": STRING,
        "pause_reason": nullable(STRING),
        "region": STRING,
        "slots": INTEGER,
        "active_jobs": INTEGER,
        "models": STRINGS,
        "jobs_served": INTEGER,
        "trust_score": NUMBER,
        "verified": BOOLEAN,
        "suspended_reason": nullable(STRING),
        "stats": map_of(ref("ModelStats"), "model id to what the device did serving it"),
        "node_version": STRING,
    },
    description="A device's live connection to this gateway",
)
_REGISTERED_DEVICE = obj(
    {
        "id": STRING,
        "account_id": STRING,
        "name": STRING,
        "token_prefix": STRING,
        "os": nullable(STRING),
        "cpu": nullable(STRING),
        "ram_mb": nullable(INTEGER),
        "accelerator": nullable(STRING),
        "region": nullable(STRING),
        "node_version": nullable(STRING),
        "created_at": TIMESTAMP,
        "last_seen_at": nullable(TIMESTAMP),
        "connection": nullable(ref("LiveDevice")),
    }
)

# -- providers, payouts and trust -------------------------------------------------------
_PAYOUT = obj(
    {
        "id": STRING,
        "object": const("payout"),
        "account_id": STRING,
        "amount_micros": MICROS,
        "amount_usd": USD_TEXT,
        "status": one_of("requested", "approved", "paid", "rejected", "cancelled"),
        "destination": nullable(STRING),
        "note": nullable(STRING),
        "transaction_id": nullable(STRING),
        "created_at": TIMESTAMP,
        "decided_at": nullable(TIMESTAMP),
        "paid_at": nullable(TIMESTAMP),
    }
)
_DATE: Schema = {"type": "string", "format": "date"}
_PROVIDER_EARNINGS: Schema = {
    "allOf": [
        ref("ProviderFunds"),
        obj(
            {
                "object": const("provider.earnings"),
                "account_id": STRING,
                "days": INTEGER,
                "since": TIMESTAMP,
                "payout_threshold_micros": MICROS,
                "payout_threshold_usd": USD_TEXT,
                "totals": ref("EarningsTotals"),
                "all_time": ref("EarningsTotals"),
                "by_day": array(extends("EarningsTotals", {"date": _DATE})),
                "by_model": array(extends("EarningsTotals", {"model": STRING})),
                "by_device": array(
                    extends(
                        "EarningsTotals",
                        {"device_id": nullable(STRING), "name": nullable(STRING)},
                    )
                ),
            }
        ),
    ]
}
_NODE_EARNINGS = obj(
    {
        "object": const("node.earnings"),
        "device_id": STRING,
        "name": STRING,
        "account_id": STRING,
        "jobs_served": INTEGER,
        "today": ref("EarningsTotals"),
        "last_30_days": ref("EarningsTotals"),
        "all_time": ref("EarningsTotals"),
        "account": ref("ProviderFunds"),
    }
)
_DEVICE_TRUST = obj(
    {
        "device_id": STRING,
        "trust_score": NUMBER,
        "trusted": BOOLEAN,
        "verified": BOOLEAN,
        "verified_by": nullable(STRING),
        "suspended": BOOLEAN,
        "suspended_reason": nullable(STRING),
        "suspicions": INTEGER,
        "suspend_at": INTEGER,
        "last_suspicion": nullable(STRING),
        "jobs_served": INTEGER,
        "jobs_failed": INTEGER,
        "canaries_passed": INTEGER,
        "canaries_failed": INTEGER,
        "connected": BOOLEAN,
        "prices": map_of(ref("Pricing"), "model id to the device's own price"),
        "stats": map_of(ref("ModelStats"), "model id to what the device did serving it"),
    },
    description="A device's trust score, the record behind it, its prices and speed",
)

# -- billing, usage -------------------------------------------------------------------
_STRIPE_RECEIPT = obj(
    {"received": BOOLEAN, "credited": BOOLEAN},
    {
        "reason": STRING,
        "account_id": STRING,
        "amount_micros": MICROS,
        "transaction_id": STRING,
    },
    description="Whether the event credited an account; the account and amount when it did",
)
_USAGE = obj(
    {
        "object": const("usage"),
        "mode": one_of("live", "test"),
        "period_start": TIMESTAMP,
        "period_end": TIMESTAMP,
        "balance_usd": USD_NUMBER,
        "balance_micros": MICROS,
        "held_micros": MICROS,
        "total_requests": INTEGER,
        "total_tokens": INTEGER,
        "total_cost_micros": MICROS,
        "total_cost_usd": USD_NUMBER,
        "by_model": map_of(
            obj(
                {
                    "requests": INTEGER,
                    "tokens": INTEGER,
                    "prompt_tokens": INTEGER,
                    "completion_tokens": INTEGER,
                    "cost_micros": MICROS,
                    "cost_usd": USD_NUMBER,
                }
            ),
            "model id to its requests, tokens and cost in the period",
        ),
        "by_key": array(
            obj(
                {
                    "key_id": nullable(STRING),
                    "name": nullable(STRING),
                    "prefix": nullable(STRING),
                    "requests": INTEGER,
                    "tokens": INTEGER,
                    "cost_micros": MICROS,
                    "daily_spend_cap_micros": nullable(MICROS),
                },
                {"spent_today_micros": MICROS},
            )
        ),
    }
)

# -- vault, webhooks --------------------------------------------------------------------
_VAULT_ENTRY = obj(
    {
        "exists": {"type": "boolean", "const": True},
        "provider": STRING,
        "last4": STRING,
        "base_url": nullable(STRING),
        "created_at": TIMESTAMP,
        "updated_at": TIMESTAMP,
    },
    description="A stored upstream key: never the key itself",
)
_VAULT_LOOKUP: Schema = {
    "anyOf": [
        obj(
            {"exists": BOOLEAN, "object": const("list"), "data": array(ref("VaultEntry"))},
            description="Without ?provider=: every stored key",
        ),
        ref("VaultEntry"),
        obj(
            {"exists": {"type": "boolean", "const": False}, "provider": STRING},
            description="With ?provider=, when the vault holds no key for it",
        ),
    ]
}
_WEBHOOK_ENDPOINT = obj(
    {
        "id": STRING,
        "object": const("webhook_endpoint"),
        "url": STRING,
        "events": STRINGS,
        "usage_threshold_micros": nullable(MICROS),
        "usage_threshold_usd": nullable(USD_TEXT),
        "created": UNIX_SECONDS,
    }
)
_WEBHOOK_DELIVERY = obj(
    {
        "id": STRING,
        "object": const("webhook_delivery"),
        "endpoint_id": STRING,
        "event_id": STRING,
        "event_type": STRING,
        "status": one_of("pending", "delivered", "failed"),
        "attempts": INTEGER,
        "last_status_code": nullable(INTEGER),
        "last_error": nullable(STRING),
        "created": UNIX_SECONDS,
        "next_attempt_at": nullable(UNIX_SECONDS),
        "delivered_at": nullable(UNIX_SECONDS),
    }
)

# -- conversations ------------------------------------------------------------------------
_CONVERSATION = obj(
    {
        "id": STRING,
        "object": const("conversation"),
        "title": nullable(STRING),
        "message_count": INTEGER,
        "model": nullable(STRING),
        "system": nullable(STRING),
        "session": nullable(
            obj(
                {"type": one_of("inactivity", "header")},
                {"id": STRING},
                description="How automatic memory split it off; null when made over the API",
            )
        ),
        "summary_version": INTEGER,
        "created_at": TIMESTAMP,
        "last_activity_at": TIMESTAMP,
    }
)
_MESSAGE_FIELDS = {
    "id": STRING,
    "object": const("conversation.message"),
    "role": STRING,
    "content": STRING,
}

# -- workflows ----------------------------------------------------------------------------
_WORKFLOW_RUN = obj(
    {
        "id": STRING,
        "object": const("workflow"),
        "type": STRING,
        "workflow": STRING,
        "requested": STRING,
        "status": STRING,
        "stop_reason": nullable(STRING),
        "task": STRING,
        "model": STRING,
        "job_id": STRING,
        "max_steps": INTEGER,
        "max_cost_micros": nullable(MICROS),
        "steps_executed": INTEGER,
        "total_cost_micros": MICROS,
        "total_cost_usd": USD_NUMBER,
        "created_at": TIMESTAMP,
        "finished_at": nullable(TIMESTAMP),
    }
)
_STEP_FIELDS = {
    "index": INTEGER,
    "name": STRING,
    "status": STRING,
    "tool": nullable(STRING),
    "model": nullable(STRING),
    "device_id": nullable(STRING),
    "job_id": nullable(STRING),
    "prompt_tokens": INTEGER,
    "completion_tokens": INTEGER,
    "cost_micros": MICROS,
    "duration_ms": INTEGER,
    "error_code": nullable(STRING),
}
_RANGE_INT = obj({"min": INTEGER, "max": INTEGER})
_WORKFLOW_ESTIMATE = obj(
    {
        "object": const("workflow.estimate"),
        "model": STRING,
        "workflow": STRING,
        "input_tokens": INTEGER,
        "input_assumed": BOOLEAN,
        "steps": _RANGE_INT,
        "estimated_cost_micros": _RANGE_INT,
        "estimated_cost_usd": obj({"min": USD_NUMBER, "max": USD_NUMBER}),
        "rate_bps": INTEGER,
        "steps_plan": STRINGS,
    },
    {"chosen_because": STRING},
)

# The components the operations below refer to, by name.
SCHEMAS: dict[str, Schema] = {
    "TokenUsage": _TOKENS,
    "Pricing": _PRICING,
    "ModelStats": _MODEL_STATS,
    "DeviceRun": _DEVICE_RUN,
    "OrchestratedRun": _ORCHESTRATED_RUN,
    "AssistantToolCall": _TOOL_CALL,
    "ChatCompletion": _CHAT_COMPLETION,
    "ChatCompletionChunk": _CHAT_CHUNK,
    "Inference": _INFERENCE,
    "InferenceChunk": _INFERENCE_CHUNK,
    "QueuedJob": _QUEUED_JOB,
    "Job": _JOB,
    "Model": _MODEL,
    "ModelList": list_of(ref("Model")),
    "NodeModelList": list_of(_NODE_MODEL, "Where each model's artifact lives"),
    "Account": _ACCOUNT,
    "Session": _SESSION,
    "SignUp": obj(
        {
            "object": const("signup"),
            "account": ref("Account"),
            "api_key": ref("ApiKeyWithSecret"),
            "session": ref("Session"),
        }
    ),
    "SignOut": obj({"object": const("session"), "account_id": STRING, "revoked": BOOLEAN}),
    "KeySettings": _KEY_SETTINGS,
    "ApiKey": _API_KEY,
    "ApiKeyWithSecret": extends("ApiKey", {"key": {"type": "string", "description": "shown once"}}),
    "ApiKeyList": list_of(ref("ApiKey")),
    "RotatedApiKey": extends(
        "ApiKey",
        {"key": {"type": "string", "description": "shown once"}, "replaced": ref("ApiKey")},
    ),
    "AdminAccount": _ADMIN_ACCOUNT,
    "AdminAccountList": list_of(ref("AdminAccount")),
    "AdminCreatedKey": obj(
        {
            "id": STRING,
            "account_id": STRING,
            "key": STRING,
            "prefix": STRING,
            "mode": one_of("live", "test"),
            "created_at": TIMESTAMP,
        }
    ),
    "AdminCreatedDevice": obj(
        {
            "id": STRING,
            "account_id": STRING,
            "token": STRING,
            "prefix": STRING,
            "created_at": TIMESTAMP,
        }
    ),
    "LiveDevice": _LIVE_DEVICE,
    "RegisteredDevice": _REGISTERED_DEVICE,
    "RegisteredDeviceList": list_of(ref("RegisteredDevice")),
    "TopUp": obj(
        {
            "object": const("top_up"),
            "account_id": STRING,
            "transaction_id": STRING,
            "amount_micros": MICROS,
            "sandbox": BOOLEAN,
            "available_micros": MICROS,
            "held_micros": MICROS,
        }
    ),
    "CheckoutSession": obj(
        {"object": const("checkout.session"), "id": STRING, "url": STRING, "amount_micros": MICROS}
    ),
    "StripeReceipt": _STRIPE_RECEIPT,
    "Usage": _USAGE,
    "EarningsTotals": _MONEY_TOTALS,
    "ProviderFunds": _FUNDS,
    "ProviderEarnings": _PROVIDER_EARNINGS,
    "NodeEarnings": _NODE_EARNINGS,
    "Payout": _PAYOUT,
    "PayoutList": list_of(ref("Payout")),
    "DeviceTrust": _DEVICE_TRUST,
    "ProviderDevice": extends(
        "DeviceTrust",
        {
            "price_bounds": map_of(
                {"type": "array", "items": ref("Pricing"), "minItems": 2, "maxItems": 2},
                "model id to the lowest and highest price the device may set",
            )
        },
    ),
    "AttestationNonce": obj({"nonce": STRING, "expires_in": INTEGER, "kind": STRING}),
    "Attested": extends("DeviceTrust", {"verdicts": STRINGS}),
    "VaultEntry": _VAULT_ENTRY,
    "VaultLookup": _VAULT_LOOKUP,
    "VaultDeleted": obj({"deleted": INTEGER, "provider": nullable(STRING)}),
    "WebhookEndpoint": _WEBHOOK_ENDPOINT,
    "WebhookEndpointWithSecret": extends("WebhookEndpoint", {"secret": STRING}),
    "WebhookEndpointList": list_of(ref("WebhookEndpoint")),
    "WebhookEndpointDeleted": obj(
        {"id": STRING, "object": const("webhook_endpoint"), "deleted": BOOLEAN}
    ),
    "WebhookDeliveryList": list_of(_WEBHOOK_DELIVERY),
    "Conversation": _CONVERSATION,
    "ConversationPage": obj(
        {
            "object": const("list"),
            "data": array(ref("Conversation")),
            "first_id": nullable(STRING),
            "last_id": nullable(STRING),
            "has_more": BOOLEAN,
        }
    ),
    "ConversationDetail": extends(
        "Conversation",
        {
            "summary": nullable(
                obj(
                    {
                        "version": INTEGER,
                        "content": STRING,
                        "through_message_id": STRING,
                        "created_at": TIMESTAMP,
                    }
                )
            ),
            "messages": array(obj({**_MESSAGE_FIELDS, "created_at": TIMESTAMP})),
        },
    ),
    "AddedMessages": obj(
        {"object": const("list"), "conversation_id": STRING, "data": array(obj(_MESSAGE_FIELDS))}
    ),
    "ConversationDeleted": obj(
        {"id": STRING, "object": const("conversation.deleted"), "deleted": BOOLEAN}
    ),
    "WorkflowRun": _WORKFLOW_RUN,
    "WorkflowPage": obj(
        {"object": const("list"), "workflows": array(ref("WorkflowRun")), "total": INTEGER},
        description="A page of runs, newest first; total counts every run of the account",
    ),
    "WorkflowStep": obj(_STEP_FIELDS, description="One finished step of a workflow run"),
    "WorkflowDetail": extends(
        "WorkflowRun",
        {"steps": array(obj({**_STEP_FIELDS, "cost_usd": USD_NUMBER}))},
    ),
    "WorkflowEstimate": _WORKFLOW_ESTIMATE,
    "Health": obj({"status": STRING}),
    "Readiness": obj({"status": STRING}, {"devices": INTEGER}),
}
