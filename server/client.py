"""A small HTTP client of the farm's API, for the CLI, the demo and NAS code.

Needs httpx (and rich for progress bars) only: NAS code can use it with a client token::

    with FarmClient("http://farm:8000", token="...") as farm:
        ids = farm.submit("rpi4-ort-1t-b1", "nb201", keys)
        jobs = farm.wait_for_jobs(ids)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
from rich.progress import Progress

TERMINAL_JOB_STATES = {"done", "failed", "cancelled"}
TERMINAL_ONBOARDING_STATES = {"ready", "failed"}
TERMINAL_TASK_STATES = {"done", "failed"}


class FarmError(RuntimeError):
    """The server refused a request (`status_code` is its HTTP status; the message is the
    server's), or the work it started failed or timed out (`status_code` is None)."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class FarmClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/api/v1", headers=headers, timeout=timeout)

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise FarmError(f"{method} {path}: {response.status_code} {detail}", response.status_code)
        return response.json() if response.content else None

    def device(self, name: str) -> dict[str, Any] | None:
        response = self.http.get(f"/devices/{name}")
        return response.json() if response.status_code == 200 else None

    def wait_for_device(self, name: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (device := self.device(name)) is None or not device["agents"]:
            if time.monotonic() > deadline:
                raise FarmError(f"no agent registered device {name!r} within {timeout_s:.0f} s")
            time.sleep(0.2)
        return device

    def submit(self, device: str | None, space: str, architectures: Sequence[str], preset: str = "standard", *,
               selector: str | None = None, force: bool = False, priority: int = 0) -> list[int]:
        """Queue one job per architecture on `device`, or on any device matching `selector`."""
        body = {"device": device, "selector": selector, "space": space, "preset": preset, "force": force,
                "priority": priority}
        return [self.request("POST", "/jobs", json={**body, "architecture": key})["id"] for key in architectures]

    def wait_for_jobs(self, job_ids: Sequence[int], progress: Progress | None = None, label: str = "measure",
                      poll_s: float = 0.5) -> list[dict[str, Any]]:
        task = progress.add_task(label, total=len(job_ids)) if progress is not None else None
        pending = {job_id: None for job_id in job_ids}
        finished: dict[int, dict[str, Any]] = {}
        while pending:
            # jobs run roughly in submission order: stop at the first unfinished one
            for job_id in list(pending):
                job = self.request("GET", f"/jobs/{job_id}")
                if job["status"] not in TERMINAL_JOB_STATES:
                    break
                finished[job_id] = job
                del pending[job_id]
            if progress is not None and task is not None:
                progress.update(task, completed=len(finished))
            if pending:
                time.sleep(poll_s)
        return [finished[job_id] for job_id in job_ids]

    def onboard(self, device: str, space: str, samples: int, sampler: str = "default",
                progress: Progress | None = None, seed: int = 0, budget: int | None = None,
                target_uncertainty: float | None = None) -> dict[str, Any]:
        """Start an onboarding and wait until its predictor is ready (or it failed); with a `budget`,
        active learning measures more architectures, as many as `budget` in all."""
        onboarding = self.request("POST", f"/devices/{device}/onboard",
                                  json={"space": space, "samples": samples, "sampler": sampler, "seed": seed,
                                        "budget": budget, "target_uncertainty": target_uncertainty})
        task = progress.add_task(f"onboard {device}", total=onboarding["jobs_total"]) if progress is not None else None
        while onboarding["status"] not in TERMINAL_ONBOARDING_STATES:
            time.sleep(0.5)
            onboarding = self.request("GET", f"/onboardings/{onboarding['id']}")
            if progress is not None and task is not None:
                progress.update(task, completed=onboarding["jobs_done"] + onboarding["jobs_failed"],
                                total=onboarding["jobs_total"])
        if onboarding["status"] == "failed":
            raise FarmError(f"onboarding {onboarding['id']} failed: {onboarding['error']}")
        return onboarding

    def pretrain(self, space: str, devices: Sequence[str] | None = None, seed: int = 0,
                 timeout_s: float = 3600.0) -> dict[str, Any]:
        """Queue a base predictor's pre-training, wait for it, and return the predictor."""
        task = self.request("POST", "/predictors/pretrain",
                            json={"space": space, "devices": list(devices) if devices else None, "seed": seed})
        task = self.wait_for_task(task["id"], timeout_s)
        return self.request("GET", f"/predictors/{task['predictor_id']}")

    def wait_for_task(self, task_id: int, timeout_s: float = 3600.0, poll_s: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (task := self.request("GET", f"/tasks/{task_id}"))["status"] not in TERMINAL_TASK_STATES:
            if time.monotonic() > deadline:
                raise FarmError(f"training task {task_id} still {task['status']} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        if task["status"] == "failed":
            raise FarmError(f"training task {task_id} failed: {task['error']}")
        return task

    def explain(self, device: str, space: str) -> dict[str, Any]:
        return self.request("GET", f"/devices/{device}/explain", params={"space": space})

    def predict(self, device: str, space: str, architectures: Sequence[str] | str,
                predictor_id: int | None = None) -> dict[str, Any]:
        """Latency and uncertainty of `architectures` (or "all") by the device's newest ready
        predictor, or by `predictor_id`."""
        return self.request("POST", "/predict", json={"device": device, "space": space, "architectures": architectures,
                                                      "predictor_id": predictor_id})
