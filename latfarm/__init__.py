"""The farm's Python client for NAS code: ``from latfarm import FarmClient``.

Needs httpx and pydantic only (``pip install 'latfarm[client]'``), neither torch nor the server::

    with FarmClient("http://farm:8000", token="...") as farm:
        prediction = farm.predict("rpi4-ort-1t-b1", "nb201", keys)
        jobs = farm.measure("rpi4-ort-1t-b1", "nb201", keys[:5])
"""

from latfarm.client import FarmClient
from latfarm.errors import (
    ApiError,
    Conflict,
    FarmError,
    InvalidRequest,
    NotFound,
    RateLimited,
    RetryLater,
    ServerError,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    WorkFailed,
)
from latfarm.models import Artifact, Device, Explanation, Job, Onboarding, Prediction, Predictor, Space, Task

__all__ = [
    "ApiError", "Artifact", "Conflict", "Device", "Explanation", "FarmClient", "FarmError", "InvalidRequest", "Job",
    "NotFound", "Onboarding", "Prediction", "Predictor", "RateLimited", "RetryLater", "ServerError", "Space", "Task",
    "Unauthorized", "Unavailable", "WaitTimeout", "WorkFailed",
]
