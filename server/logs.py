"""Server logging: one line per record, as text or JSON, tagged with the request's id and with
bearer tokens and `token=` values masked."""

from __future__ import annotations

import logging
import multiprocessing
import re
from contextvars import ContextVar
from uuid import uuid4

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: the id of the request being served, None outside a request
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
#: an `X-Request-ID` a client may choose; anything else is replaced by a fresh id
VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
SECRET = re.compile(r"(?i)(\bbearer\s+|token=)[^\s&'\"\\]+")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class RequestId:
    """Takes the request's `X-Request-ID` (or makes one), keeps it in `REQUEST_ID` while the request
    is served and returns it as the response's `x-request-id` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        request_id = given.decode() if VALID_ID.fullmatch(given) else uuid4().hex
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = REQUEST_ID.set(request_id)
        await self.app(scope, receive, send_with_id)
        # not in a `finally`: after an exception, the 500 handler and uvicorn's error and access
        # lines, all outside this middleware, still carry the id (uvicorn gives each request a
        # context of its own, so it goes no further)
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def mask_secrets(text: str) -> str:
    """`Bearer abc` -> `Bearer ***`, `?token=abc` -> `?token=***`."""
    return SECRET.sub(r"\1***", text)


class MaskSecrets(logging.Filter):
    """Masks secrets in the message (its arguments included) and in the exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info:
            record.exc_text = mask_secrets(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None  # formatters then print exc_text, the masked one
        return True


def configure_logging(fmt: str, level: str = "INFO") -> None:
    """Send every record, uvicorn's included, to stderr as `fmt` ("json" or "text") lines."""
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r}; use 'json' or 'text'")
    handler = logging.StreamHandler()
    handler.setLevel(level.upper())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(MaskSecrets())
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s %(request_id)s",
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI-coloured copy of message
            timestamp=True,
        )
        if fmt == "json"
        else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(handlers=[handler], level=level.upper(), force=True)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        # handlers of uvicorn's own logging config: drop them so that its records reach ours (a
        # logger uvicorn left without handlers already propagates, or is off: --no-access-log)
        if logger.handlers:
            logger.handlers.clear()
            logger.propagate = True


def configure_worker_logging(fmt: str, level: str = "INFO") -> None:
    """`configure_logging` in a `latfarm server --workers N` worker, a child process whose logging
    starts bare; a no-op where the app is built in the process that configured it (or embeds it)."""
    if multiprocessing.parent_process() is not None:
        configure_logging(fmt, level)
