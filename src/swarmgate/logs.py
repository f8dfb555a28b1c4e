"""Log set-up. Records carry ids, codes and timings as extras; never prompt or completion text."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

import orjson

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}
# Libraries whose DEBUG output carries payloads (WebSocket frames, SQL parameters, HTTP
# bodies). They stay at WARNING whatever the level asked for: prompts never reach a log.
PAYLOAD_LOGGERS = (
    "websockets",
    "aiosqlite",
    "sqlalchemy",
    "httpx",
    "httpcore",
    "openai",
    "uvicorn.protocols",
    "llama_cpp",
    "llama-cpp-python",
)
# Extras with these names are dropped even if some caller passes them by mistake.
_FORBIDDEN = frozenset({"prompt", "messages", "content", "text", "completion", "output"})


# The id of the HTTP request being handled (api/request_ids.py), on every log line.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    extras = {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and k not in _FORBIDDEN
    }
    current = request_id.get()
    if current is not None:
        extras.setdefault("request_id", current)
    return extras


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in PAYLOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
