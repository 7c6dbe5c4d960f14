"""API errors: every failure the client caused answers a 4xx JSON body, never a 500."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
#: seconds a client is asked to wait when the database is unavailable
DATABASE_RETRY_AFTER_S = 2


class ApiError(Exception):
    status_code = 400

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field

    def headers(self) -> dict[str, str] | None:
        return None


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class Invalid(ApiError):
    status_code = 422


class Unauthorized(ApiError):
    status_code = 401

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ApiError):
    status_code = 403


class PayloadTooLarge(ApiError):
    status_code = 413


class TooManyRequests(ApiError):
    status_code = 429

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_s)}


def _body(detail: str, field: str | None = None, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"detail": detail}
    if field is not None:
        body["field"] = field
    body.update(extra)
    return body


class FieldError(BaseModel):
    field: str
    message: str


class Error(BaseModel):
    """The body of every 4xx answer."""

    detail: str
    field: str | None = None
    errors: list[FieldError] | None = None


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(_body(exc.detail, exc.field), status_code=exc.status_code, headers=exc.headers())


#: what the database raises when it went away (a restart, a lost connection) or is locked
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


def database_unavailable(method: str, path: str, exc: DBAPIError) -> JSONResponse:
    """503: worth a retry, not a bug."""
    log.warning("database unavailable on %s %s: %s", method, path,
                str(exc.orig).splitlines()[0] if exc.orig is not None else exc)
    return JSONResponse(_body("the database is unavailable; retry later"), status_code=503,
                        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})


def install_error_handlers(app: FastAPI) -> None:
    _document_errors(app)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(part) for part in err["loc"]), "message": err["msg"]} for err in exc.errors()
        ]
        first = errors[0] if errors else {"field": None, "message": "invalid request"}
        return JSONResponse(
            _body(f"{first['field']}: {first['message']}", first["field"], errors=errors), status_code=422
        )

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError) -> JSONResponse:
        # the database refused a value the client sent: a NUL character in text (Postgres), a
        # string longer than its column, a number out of range
        reason = str(exc.orig).splitlines()[0] if exc.orig is not None else "invalid value"
        return JSONResponse(_body(f"a value the database cannot store: {reason}"), status_code=422)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(request: Request, exc: DBAPIError) -> JSONResponse:
        return database_unavailable(request.method, request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(_body("internal server error"), status_code=500)


def _document_errors(app: FastAPI) -> None:
    """Say in the OpenAPI document that any operation may answer a 4xx `Error` body (a bad or
    missing token, an unknown name, a conflict, a body too large, ...), and that a 422 is one too,
    not FastAPI's HTTPValidationError, which the handlers above replace."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        error = Error.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error.pop("$defs"))
        components["Error"] = error
        response = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {"description": "Validation Error", **response}
                responses["4XX"] = {"description": "Client Error", **response}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


class BodySizeLimit:
    """Refuses request bodies over `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(_body(self._message()), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # an HTTPException, which FastAPI lets through while it reads a body (it answers
                    # any other error there with 400 "There was an error parsing the body")
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_bytes} bytes"
