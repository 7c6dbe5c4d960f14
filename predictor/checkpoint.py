"""The predictor's file format: tensors and plain data only, read with `weights_only=True`.

Format 4 adds the reference devices' measured latencies, the learned prior over reference
weights and a Gaussian target fit. Formats 2 and 3 still load: their networks and sampler
choices as they were, no measured table (the networks fill every reference latency), the prior
learned again from the networks on first use, and an adapted target's bootstrap fits turned
into the Gaussian they sample (mean and covariance of the fits, no extra noise).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from os import PathLike
from typing import Any, BinaryIO

import numpy as np
import torch

from predictor.adaptation import DeviceFit, ReferencePrior
from predictor.network import Ensemble, MultiDeviceNet
from predictor.pretraining import TrainConfig
from predictor.reference import LatencyTable

FORMAT = "latfarm.predictor/4"
#: formats `load` converts (no measured table, bootstrap target fits)
OLDER_FORMATS = ("latfarm.predictor/2", "latfarm.predictor/3")


@dataclass(frozen=True)
class Parts:
    """Everything a `LatencyPredictor` is made of, as a checkpoint holds it."""

    space: str
    reference_devices: list[str]
    ensemble: Ensemble
    descriptor_mean: np.ndarray
    descriptor_std: np.ndarray
    config: TrainConfig
    measured: LatencyTable | None
    target: DeviceFit | None
    preferred_samplers: dict[int, str]
    sampler_scores: dict[str, dict[int, float]]
    prior: ReferencePrior | None


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values))


def save(parts: Parts, file: str | PathLike[str] | BinaryIO) -> None:
    ensemble, target, measured = parts.ensemble, parts.target, parts.measured
    state: dict[str, Any] = {
        "format": FORMAT,
        "space": parts.space,
        "reference_devices": list(parts.reference_devices),
        "config": parts.config.__dict__,
        "feature_mean": _tensor(ensemble.feature_mean),
        "feature_std": _tensor(ensemble.feature_std),
        "log_mean": _tensor(np.asarray(ensemble.log_mean, dtype=np.float32)),
        "log_std": _tensor(np.asarray(ensemble.log_std, dtype=np.float32)),
        "descriptor_mean": _tensor(parts.descriptor_mean),
        "descriptor_std": _tensor(parts.descriptor_std),
        "members": [member.state_dict() for member in ensemble.members],
        "measured": None if measured is None else {
            "keys": list(measured.keys), "devices": list(measured.devices), "log_ms": _tensor(measured.log_ms),
        },
        "prior": None if parts.prior is None else {"cov": _tensor(parts.prior.cov), "unexplained": parts.prior.unexplained},
        "target": None if target is None else {
            "name": target.name, "coef": _tensor(target.coef), "cov": _tensor(target.cov), "noise": target.noise,
            "scales": list(target.scales), "samples": target.samples, "per_network": target.per_network,
        },
        "preferred_samplers": dict(parts.preferred_samplers),
        "sampler_scores": {name: dict(per_k) for name, per_k in parts.sampler_scores.items()},
    }
    torch.save(state, file)


def load(file: str | PathLike[str] | BinaryIO | bytes) -> Parts:
    if isinstance(file, bytes):
        file = io.BytesIO(file)
    state = torch.load(file, weights_only=True)
    version = state.get("format") if isinstance(state, dict) else None
    if version != FORMAT and version not in OLDER_FORMATS:
        raise ValueError(f"not a latfarm predictor checkpoint (format {version!r}; this version reads "
                         f"{', '.join((*OLDER_FORMATS, FORMAT))})")
    config = TrainConfig(**state["config"])
    devices = list(state["reference_devices"])
    members = []
    for member_state in state["members"]:
        member = MultiDeviceNet(member_state["trunk.0.weight"].shape[1], len(devices), config.hidden, config.depth)
        member.load_state_dict(member_state)
        members.append(member.eval())
    ensemble = Ensemble(members, state["feature_mean"].numpy(), state["feature_std"].numpy(),
                        state["log_mean"].numpy(), state["log_std"].numpy())
    measured = prior = None
    if version == FORMAT:
        if state["measured"] is not None:
            table = state["measured"]
            measured = LatencyTable(list(table["keys"]), list(table["devices"]), table["log_ms"].numpy())
        if state["prior"] is not None:
            prior = ReferencePrior(state["prior"]["cov"].numpy(), float(state["prior"]["unexplained"]))
    return Parts(state["space"], devices, ensemble, state["descriptor_mean"].numpy(), state["descriptor_std"].numpy(),
                 config, measured, _target(state["target"], version), dict(state.get("preferred_samplers") or {}),
                 dict(state.get("sampler_scores") or {}), prior)


def _target(target: dict[str, Any] | None, version: str) -> DeviceFit | None:
    if target is None:
        return None
    if version == FORMAT:
        return DeviceFit(target["name"], target["coef"].numpy(), target["cov"].numpy(), float(target["noise"]),
                         tuple(target["scales"]), dict(target["samples"]), bool(target["per_network"]))
    # bootstrap fits (n_boot, n_design) and intercepts (n_boot,): the Gaussian they sample
    fits = np.hstack([target["intercept"].numpy()[:, None], target["coef"].numpy()]).astype(np.float64)
    return DeviceFit(target["name"], fits.mean(axis=0), np.cov(fits, rowvar=False), 0.0,
                     tuple(target["penalties"]), dict(target["samples"]), per_network=False)
