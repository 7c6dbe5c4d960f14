"""HTTP client for the latfarm server's agent API (`/api/v1`)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from agent import __version__
from agent.backoff import full_jitter
from agent.cache import ArtifactCache, ArtifactDownloadError
from agent.protocol import (
    ArtifactRef,
    HeartbeatRequest,
    HeartbeatResponse,
    JobLease,
    JobResult,
    RegisterRequest,
    RegisterResponse,
    ResultReply,
)

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class ServerError(Exception):
    """Base class of everything the client raises about the server."""


class ServerUnavailable(ServerError):
    """Connection errors or 5xx answers persisted through every retry."""


class ApiError(ServerError):
    """The server answered a 4xx (or an unexpected status / malformed body)."""

    def __init__(self, method: str, path: str, status_code: int, detail: Any) -> None:
        self.method = method
        self.path = path
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"{method} {path} -> HTTP {status_code}: {detail}")


class AuthError(ApiError):
    """401/403: the token was refused."""


class BadLeaseError(ApiError):
    """A 200 lease the agent cannot parse (e.g. a protocol mismatch). `job_id`/`lease_id` are set
    when the body still carries them, so the agent can report the job failed instead of letting
    its lease expire again and again."""

    def __init__(self, response: httpx.Response, error: Exception, field: str | None = None) -> None:
        """`field`: the member of the body that holds the lease (None: the body is the lease)."""
        super().__init__(response.request.method, response.request.url.path, response.status_code,
                         f"bad lease: {error}")
        self.job_id: int | None = None
        self.lease_id: str | None = None
        try:
            body = response.json()
        except ValueError:
            return
        if isinstance(body, dict) and field is not None:
            body = body.get(field)
        if isinstance(body, dict):
            job_id, lease_id = body.get("job_id"), body.get("lease_id")
            if isinstance(job_id, int) and not isinstance(job_id, bool) and isinstance(lease_id, str):
                self.job_id, self.lease_id = job_id, lease_id


class LeaseLostError(ApiError):
    """409 on a job call: the lease is stale (expired, re-leased or the job is finished)."""


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return body["detail"]
    return body


@dataclass(frozen=True)
class Delivery:
    """The server's answer to a result."""

    accepted: bool
    next_lease: JobLease | None = None
    #: a next lease the agent cannot parse, to report as failed
    bad_lease: BadLeaseError | None = None


class ServerClient:
    """Talks to one server. `token` authenticates the calls (a registration token or an agent
    token); `register()` swaps in the agent token it gets back. Connection errors, 5xx and 429 are
    retried with capped exponential backoff and full jitter, at most `max_attempts` tries per call;
    other statuses are returned to the caller of `_request`, and the public methods turn unexpected
    ones into ApiError."""

    def __init__(
        self,
        server: str,
        token: str,
        *,
        connect_timeout_s: float = 10.0,
        io_timeout_s: float = 60.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        backoff_max_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self._io_timeout_s = io_timeout_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._http = httpx.Client(
            base_url=self.server,
            headers={"User-Agent": f"latfarm-agent/{__version__}", "Accept": "application/json"},
            timeout=httpx.Timeout(io_timeout_s, connect=connect_timeout_s),
            transport=transport,
            follow_redirects=False,
        )
        self.set_token(token)

    # ------------------------------------------------------------------ plumbing

    def set_token(self, token: str) -> None:
        self._http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _backoff(self, attempt: int, retry_after: float | None = None) -> float:
        delay = full_jitter(attempt, self.backoff_s, self.backoff_max_s, self._rng)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _retrying(self, what: str, call: Callable[[], T], attempts: int | None = None) -> T:
        """Run `call`, retrying transport errors and RetryableStatus up to `attempts` times."""
        attempts = self.max_attempts if attempts is None else max(1, attempts)
        last: Exception | None = None
        for attempt in range(attempts):
            retry_after: float | None = None
            try:
                return call()
            except httpx.TransportError as exc:
                last = exc
            except _RetryableStatus as exc:
                last = exc
                retry_after = exc.retry_after
            if attempt + 1 < attempts:
                delay = self._backoff(attempt, retry_after)
                log.warning("%s failed (%s); retry %d/%d in %.1f s", what, last, attempt + 1, attempts - 1, delay)
                self._sleep(delay)
        raise ServerUnavailable(f"{what} failed after {attempts} attempts: {last}") from last

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: BaseModel | None = None,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout | None = None,
        attempts: int | None = None,
    ) -> httpx.Response:
        url = API_PREFIX + path
        body = json.model_dump(mode="json") if json is not None else None

        def call() -> httpx.Response:
            kwargs: dict[str, Any] = {"json": body, "params": params}
            if timeout is not None:
                kwargs["timeout"] = timeout
            response = self._http.request(method, url, **kwargs)
            if response.status_code >= 500 or response.status_code == 429:
                raise _RetryableStatus(response)
            return response

        return self._retrying(f"{method} {url}", call, attempts)

    @staticmethod
    def _error(response: httpx.Response) -> ApiError:
        request = response.request
        method, path = request.method, request.url.path
        cls = AuthError if response.status_code in (401, 403) else ApiError
        if response.status_code == 409:
            cls = LeaseLostError
        return cls(method, path, response.status_code, _detail(response))

    @staticmethod
    def _parse(response: httpx.Response, model: type[M]) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise ApiError(
                response.request.method, response.request.url.path, response.status_code, f"malformed body: {exc}"
            ) from exc

    # --------------------------------------------------------------------- API

    def register(self, request: RegisterRequest) -> RegisterResponse:
        """POST /agents/register with the current token: the registration token, or a stored
        agent token to re-register as the same agent. Afterwards the client uses the returned
        agent token."""
        response = self._request("POST", "/agents/register", json=request)
        if response.status_code not in (200, 201):
            raise self._error(response)
        registered = self._parse(response, RegisterResponse)
        self.set_token(registered.agent_token)
        return registered

    def next_job(self, wait_s: float) -> JobLease | None:
        """Long-poll GET /agents/me/jobs/next?wait=...: a lease, or None on 204."""
        timeout = httpx.Timeout(
            self._io_timeout_s, connect=self._connect_timeout_s, read=max(self._io_timeout_s, wait_s + 30.0)
        )
        response = self._request("GET", "/agents/me/jobs/next", params={"wait": f"{wait_s:g}"}, timeout=timeout)
        if response.status_code == 204:
            return None
        if response.status_code != 200:
            raise self._error(response)
        try:
            return JobLease.model_validate_json(response.content)
        except ValidationError as exc:
            raise BadLeaseError(response, exc) from exc

    def heartbeat(
        self, job_id: int, lease_id: str, *, attempts: int | None = 3, timeout_s: float = 15.0
    ) -> HeartbeatResponse:
        """POST /jobs/{id}/heartbeat. Raises LeaseLostError on 409. Short timeout and few
        attempts: a heartbeat that cannot get through soon is better skipped than queued."""
        response = self._request(
            "POST",
            f"/jobs/{job_id}/heartbeat",
            json=HeartbeatRequest(lease_id=lease_id),
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, self._connect_timeout_s)),
            attempts=attempts,
        )
        if response.status_code != 200:
            raise self._error(response)
        return self._parse(response, HeartbeatResponse)

    def post_result(self, job_id: int, result: JobResult, *, lease_next: bool = False) -> Delivery:
        """POST /jobs/{id}/result: accepted (2xx) or not (409, the lease was stale); with
        `lease_next`, the server also leases the agent's next job, if one is queued, in the answer."""
        params = {"lease_next": "true"} if lease_next else None
        response = self._request("POST", f"/jobs/{job_id}/result", json=result, params=params)
        if response.status_code == 409:
            log.warning("job %d: result refused, lease is stale (%s)", job_id, _detail(response))
            return Delivery(accepted=False)
        if not 200 <= response.status_code < 300:
            raise self._error(response)
        try:
            return Delivery(accepted=True, next_lease=ResultReply.model_validate_json(response.content).next_lease)
        except ValidationError as exc:
            return Delivery(accepted=True, bad_lease=BadLeaseError(response, exc, field="next_lease"))

    def fetch_artifact(self, ref: ArtifactRef, cache: ArtifactCache) -> Path:
        """The artifact's local path: from the cache (re-verified), else downloaded from `ref.url`
        (relative to the server base URL) and verified. Retries connection errors and 5xx."""
        hit = cache.get(ref.sha256)
        if hit is not None:
            return hit

        def call() -> Path:
            try:
                return cache.download(self._http, ref.url, ref.sha256, ref.size_bytes)
            except ArtifactDownloadError as exc:
                if exc.status_code is not None and (exc.status_code >= 500 or exc.status_code == 429):
                    raise _RetryableStatusCode(exc.status_code, str(exc)) from exc
                raise

        return self._retrying(f"GET {ref.url}", call)


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.retry_after: float | None = None
        header = response.headers.get("Retry-After")
        if header:
            try:
                self.retry_after = float(header)
            except ValueError:
                pass
        super().__init__(f"HTTP {response.status_code}: {_detail(response)}")


class _RetryableStatusCode(_RetryableStatus):
    def __init__(self, status_code: int, message: str) -> None:  # no response object
        Exception.__init__(self, message)
        self.status_code = status_code
        self.retry_after = None
