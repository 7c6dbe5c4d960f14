"""What FarmClient raises: one exception class per kind of answer a caller handles differently."""

from __future__ import annotations

import httpx


class FarmError(Exception):
    """Anything FarmClient raises on purpose. `status_code` is the server's HTTP status, or None
    when the request succeeded but the work it started failed or did not finish in time."""

    status_code: int | None = None


class ApiError(FarmError):
    """The server refused a request with an error answer: `detail` is its message and `field`
    the request field it blames, when it names one."""

    def __init__(self, method: str, path: str, status_code: int, detail: str, field: str | None = None) -> None:
        super().__init__(f"{method} {path}: {status_code} {detail}")
        self.status_code = status_code
        self.detail = detail
        self.field = field


class InvalidRequest(ApiError):
    """400, 413 or 422: well-formed but rejected values (an unknown space, an invalid key, a body
    too large)."""


class Unauthorized(ApiError):
    """401 (a missing or wrong token) or 403 (a token without the scope)."""


class NotFound(ApiError):
    """404: no such device, job, predictor, ..."""


class Conflict(ApiError):
    """409: the request does not fit the farm's state (no predictor serves the device yet, the name
    is taken, ...)."""


class RetryLater(ApiError):
    """429 (rate limit reached) or 503 (server busy or its database down): retrying after
    `retry_after_s` seconds (the server's Retry-After; None when it sent none) may succeed."""

    def __init__(self, method: str, path: str, status_code: int, detail: str, field: str | None,
                 retry_after_s: float | None) -> None:
        super().__init__(method, path, status_code, detail, field)
        self.retry_after_s = retry_after_s


class RateLimited(RetryLater):
    """429: the token's rate limit is reached."""


class Unavailable(RetryLater):
    """503: the server cannot serve now."""


class ServerError(ApiError):
    """Any other 5xx: a bug or outage on the server's side."""


class WorkFailed(FarmError):
    """An onboarding or a training task the farm ran ended in failure (its error is the message)."""


class WaitTimeout(FarmError, TimeoutError):
    """What a wait_for_* call waited for did not happen within its timeout."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict, 413: InvalidRequest,
    422: InvalidRequest,
}


def raise_for_answer(response: httpx.Response) -> None:
    """Raise the ApiError subclass of an error answer; do nothing for a success."""
    if not response.is_error:
        return
    request = response.request
    method, path = request.method, request.url.path
    detail, field = response.text, None
    try:
        body = response.json()
    except ValueError:  # a proxy's HTML page, an empty body
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        detail, field = body["detail"], body.get("field")
    status = response.status_code
    if status in (429, 503):
        retry_type = RateLimited if status == 429 else Unavailable
        raise retry_type(method, path, status, detail, field, _retry_after_s(response))
    error_type = _BY_STATUS.get(status, InvalidRequest if status < 500 else ServerError)
    raise error_type(method, path, status, detail, field)


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:  # the HTTP-date form, which this server never sends
        return None
