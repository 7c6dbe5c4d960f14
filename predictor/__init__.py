"""Latency predictors for NAS search spaces: encodings, pre-training, samplers, few-shot adaptation.

The names below load on first use: they import torch, which the server's settings and the CLI's
`--help` must not pay for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from predictor.model import LatencyPredictor, TrainConfig
    from predictor.samplers import get_sampler
    from predictor.spaces import InvalidArchitecture, SearchSpace, get_space

_HOMES = {
    "LatencyPredictor": "predictor.model",
    "TrainConfig": "predictor.model",
    "get_sampler": "predictor.samplers",
    "InvalidArchitecture": "predictor.spaces",
    "SearchSpace": "predictor.spaces",
    "get_space": "predictor.spaces",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'predictor' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
