"""FarmClient: the farm's HTTP API for NAS code, the CLI and the demo (httpx and pydantic only)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import httpx

from latfarm.errors import WaitTimeout, WorkFailed, raise_for_answer
from latfarm.models import (
    FINISHED_ONBOARDING,
    FINISHED_TASK,
    Answer,
    Artifact,
    Device,
    Explanation,
    Job,
    JobStatus,
    Onboarding,
    Page,
    Prediction,
    Predictor,
    Preset,
    Space,
    Task,
)

M = TypeVar("M", bound=Answer)
#: called with (finished, total) as a wait makes progress
Progress = Callable[[int, int], None]


class FarmClient:
    """A farm at `base_url` (e.g. ``http://farm:8000``), with an admin or client token.

    Every method raises a :class:`latfarm.FarmError` subclass when the server refuses: NotFound
    (404), Conflict (409), InvalidRequest (400, 413, 422), Unauthorized (401, 403), RateLimited
    (429) and Unavailable (503) with the server's Retry-After, ServerError (other 5xx). httpx's
    TransportError means the server could not be reached."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ devices

    def devices(self, space: str | None = None) -> list[Device]:
        """Every device, or those with measurements in `space`."""
        return list(self._pages(Device, "/devices", space=space))

    def device(self, name: str) -> Device:
        return self._call(Device, "GET", f"/devices/{name}")

    def wait_for_device(self, name: str, timeout_s: float = 60.0, poll_s: float = 0.2) -> Device:
        """The device, once an agent has registered it and serves it."""
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self.http.get(f"/devices/{name}")
            if answer.status_code != 404:
                raise_for_answer(answer)
                if (device := Device.model_validate_json(answer.content)).agents:
                    return device
            if time.monotonic() > deadline:
                raise WaitTimeout(f"no agent serves device {name!r} after {timeout_s:.0f} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ search spaces

    def spaces(self) -> list[Space]:
        """Every search space the farm has installed: size, key format, reference devices, base predictor."""
        return list(self._pages(Space, "/spaces"))

    # ------------------------------------------------------------------ prediction

    def predict(self, device: str, space: str, architectures: Sequence[str] | Literal["all"],
                predictor_id: int | None = None) -> Prediction:
        """Latency and uncertainty (ms) of `architectures` (canonical keys, or "all" for a whole
        enumerable space) by the device's newest ready predictor, or by `predictor_id`."""
        keys: list[str] | str = architectures if architectures == "all" else list(architectures)
        return self._call(Prediction, "POST", "/predict", json={
            "device": device, "space": space, "architectures": keys, "predictor_id": predictor_id})

    def predictors(self, space: str | None = None) -> list[Predictor]:
        return list(self._pages(Predictor, "/predictors", space=space))

    def predictor(self, predictor_id: int) -> Predictor:
        return self._call(Predictor, "GET", f"/predictors/{predictor_id}")

    def explain(self, device: str, space: str = "nb201") -> Explanation:
        """Which reference devices an adapted device resembles, and what each operation costs on it."""
        return self._call(Explanation, "GET", f"/devices/{device}/explain", params={"space": space})

    # ------------------------------------------------------------------ measurement jobs

    def submit(self, device: str | None, space: str, architectures: Sequence[str], preset: Preset = "standard", *,
               selector: str | None = None, force: bool = False, priority: int = 0,
               queue_deadline_s: float | None = None) -> list[Job]:
        """Queue one measurement per architecture on `device`, or on any device matching `selector`.
        An earlier valid measurement of the same architecture, device and preset is reused
        (`reused`, already done) unless `force`."""
        body = _drop_none(device=device, selector=selector, space=space, preset=preset, force=force,
                          priority=priority, queue_deadline_s=queue_deadline_s)
        return [self._call(Job, "POST", "/jobs", json={**body, "architecture": key}) for key in architectures]

    def upload_artifact(self, model: bytes) -> Artifact:
        """Store an ONNX or LiteRT (.tflite) model (checked by the server) under its sha256; measure
        it with submit_artifact."""
        return self._call(Artifact, "POST", "/artifacts", content=model,
                          headers={"Content-Type": "application/octet-stream"})

    def submit_artifact(self, device: str | None, sha256: str, preset: Preset = "standard", *,
                        selector: str | None = None, force: bool = False, priority: int = 0) -> Job:
        """Queue a measurement of an uploaded model."""
        return self._call(Job, "POST", "/jobs", json=_drop_none(
            device=device, selector=selector, artifact=sha256, preset=preset, force=force, priority=priority))

    def job(self, job_id: int) -> Job:
        return self._call(Job, "GET", f"/jobs/{job_id}")

    def jobs(self, device: str | None = None, status: JobStatus | None = None,
             onboarding: int | None = None) -> Iterator[Job]:
        """Jobs in submission order, fetched a page at a time."""
        return self._pages(Job, "/jobs", device=device, status=status, onboarding=onboarding)

    def cancel(self, job_id: int) -> Job:
        return self._call(Job, "POST", f"/jobs/{job_id}/cancel")

    def wait_for_jobs(self, jobs: Sequence[Job | int], timeout_s: float | None = None, poll_s: float = 0.5,
                      on_progress: Progress | None = None) -> list[Job]:
        """The jobs (or job ids) once each is done, failed or cancelled, in the order given."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        ids = [job if isinstance(job, int) else job.id for job in jobs]
        finished = {job.id: job for job in jobs if isinstance(job, Job) and job.finished}
        while True:
            # jobs run roughly in submission order: stop at the first unfinished one
            for job_id in ids:
                if job_id not in finished:
                    if not (job := self.job(job_id)).finished:
                        break
                    finished[job_id] = job
            if on_progress is not None:
                on_progress(len(finished), len(ids))
            if len(finished) == len(ids):
                return [finished[job_id] for job_id in ids]
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"{len(ids) - len(finished)} of {len(ids)} jobs unfinished after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def measure(self, device: str, space: str, architectures: Sequence[str], preset: Preset = "standard", *,
                force: bool = False, timeout_s: float | None = None,
                on_progress: Progress | None = None) -> list[Job]:
        """Submit one job per architecture and wait for them: each `latency_ms` is the measured
        median where `status` is done."""
        submitted = self.submit(device, space, architectures, preset, force=force)
        return self.wait_for_jobs(submitted, timeout_s, on_progress=on_progress)

    # ------------------------------------------------------------------ onboarding and training

    def onboard(self, device: str, space: str = "nb201", samples: int = 20, sampler: str = "default", *,
                preset: Preset = "standard", seed: int = 0, budget: int | None = None,
                target_uncertainty: float | None = None, wait: bool = True, timeout_s: float | None = None,
                on_progress: Progress | None = None) -> Onboarding:
        """Start an onboarding (measure `samples` sampled architectures, adapt a predictor) and, with
        `wait`, return it once its predictor serves the device; raises WorkFailed if it failed.
        With a `budget`, active learning measures more architectures, as many as `budget` in all."""
        onboarding = self._call(Onboarding, "POST", f"/devices/{device}/onboard", json=_drop_none(
            space=space, samples=samples, sampler=sampler, preset=preset, seed=seed, budget=budget,
            target_uncertainty=target_uncertainty))
        return self.wait_for_onboarding(onboarding, timeout_s, on_progress=on_progress) if wait else onboarding

    def onboarding(self, onboarding_id: int) -> Onboarding:
        return self._call(Onboarding, "GET", f"/onboardings/{onboarding_id}")

    def wait_for_onboarding(self, onboarding: Onboarding | int, timeout_s: float | None = None, poll_s: float = 0.5,
                            on_progress: Progress | None = None) -> Onboarding:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        current = self.onboarding(onboarding) if isinstance(onboarding, int) else onboarding
        while True:
            if on_progress is not None:
                on_progress(current.jobs_done + current.jobs_failed, current.jobs_total)
            if current.status in FINISHED_ONBOARDING:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"onboarding {current.id} still {current.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
            current = self.onboarding(current.id)
        if current.status == "failed":
            raise WorkFailed(f"onboarding {current.id} failed: {current.error}")
        return current

    def pretrain(self, space: str, devices: Sequence[str] | None = None, seed: int = 0,
                 timeout_s: float = 3600.0) -> Predictor:
        """Queue a base predictor's pre-training (admin token), wait for it, and return the predictor."""
        task = self._call(Task, "POST", "/predictors/pretrain",
                          json={"space": space, "devices": list(devices) if devices else None, "seed": seed})
        task = self.wait_for_task(task.id, timeout_s)
        assert task.predictor_id is not None  # a done task names the predictor it made
        return self.predictor(task.predictor_id)

    def task(self, task_id: int) -> Task:
        return self._call(Task, "GET", f"/tasks/{task_id}")

    def wait_for_task(self, task_id: int, timeout_s: float = 3600.0, poll_s: float = 0.5) -> Task:
        deadline = time.monotonic() + timeout_s
        while (task := self.task(task_id)).status not in FINISHED_TASK:
            if time.monotonic() > deadline:
                raise WaitTimeout(f"training task {task_id} still {task.status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        if task.status == "failed":
            raise WorkFailed(f"training task {task_id} failed: {task.error}")
        return task

    # ------------------------------------------------------------------ plumbing

    def _call(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate_json(self._send(method, path, **kwargs).content)

    def _pages(self, model: type[M], path: str, **filters: Any) -> Iterator[M]:
        """The items of a list endpoint, page after page."""
        params = _drop_none(**filters)
        page_type: type[Page[M]] = Page[model]  # type: ignore[valid-type]  # a model given at run time
        cursor: int | None = 0
        while cursor is not None:
            page = page_type.model_validate_json(self._send("GET", path, params={**params, "cursor": cursor}).content)
            yield from page.items
            cursor = page.next_cursor

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        raise_for_answer(response)
        return response


def _drop_none(**values: Any) -> dict[str, Any]:
    """Query parameters and bodies without the arguments left out (the server's defaults apply)."""
    return {key: value for key, value in values.items() if value is not None}
