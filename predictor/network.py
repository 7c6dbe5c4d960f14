"""The pre-trained network: an ensemble of MLPs from an architecture's encoding to its
standardised log-latency on every reference device at once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class MultiDeviceNet(nn.Module):
    """Encoding -> standardised log-latency on each reference device."""

    def __init__(self, in_dim: int, n_devices: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(hidden, n_devices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(x))


@dataclass
class Ensemble:
    """The trained members and the standardisation of their inputs and outputs."""

    members: list[MultiDeviceNet]
    feature_mean: np.ndarray
    feature_std: np.ndarray
    #: per reference device: mean and std of the log-latency the heads are standardised by
    log_mean: np.ndarray
    log_std: np.ndarray

    def standardised_log_ms(self, features: np.ndarray) -> np.ndarray:
        """(members, len(features), n_reference) standardised log-latency."""
        x = torch.from_numpy(((features - self.feature_mean) / self.feature_std).astype(np.float32))
        with torch.inference_mode():
            return np.stack([member(x).numpy() for member in self.members])


def safe_std(values: np.ndarray) -> np.ndarray:
    """Column standard deviations, 1 where a column (nearly) never varies: a feature constant in
    training (e.g. "connected" when only connected cells were measured) must stay finite for
    architectures where it differs."""
    std = values.std(axis=0)
    return np.where(std < 1e-3, 1.0, std)
