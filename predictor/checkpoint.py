"""The predictor's file format: tensors and plain data only, read with `weights_only=True`.

Format 4 adds the reference devices' measured latencies, the learned prior over reference
weights and a Gaussian target fit; format 5 the network each table key builds and whether it
holds dead code (`MeasuredReference`), which took longer to work out on load than a whole-space
prediction. Format 4 still loads, working those out on load. Formats 2 and 3 still load: their
networks and sampler choices as they were, no measured table (the networks fill every reference
latency), the prior learned again from the networks on first use, and an adapted target's
bootstrap fits turned into the Gaussian they sample (mean and covariance of the fits, no extra
noise). A target fit saved before its noise was shaped by the reference devices' disagreement
(no `similarity`) keeps one noise for every architecture, and one saved before a device could be
read two ways (no `other_reading`) is read one way; a prior saved with one unexplained share for
all reference devices gives each that share.
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
from predictor.reference import LatencyTable, MeasuredReference
from predictor.spaces import get_space

FORMAT = "latfarm.predictor/5"
#: formats `load` converts: without the table's networks (4); without a measured table, with
#: bootstrap target fits (2, 3)
OLDER_FORMATS = ("latfarm.predictor/2", "latfarm.predictor/3", "latfarm.predictor/4")
#: formats with a measured table, a prior and a Gaussian target
_TABLE_FORMATS = ("latfarm.predictor/4", FORMAT)


@dataclass(frozen=True)
class Parts:
    """Everything a `LatencyPredictor` is made of, as a checkpoint holds it."""

    space: str
    reference_devices: list[str]
    ensemble: Ensemble
    descriptor_mean: np.ndarray
    descriptor_std: np.ndarray
    config: TrainConfig
    reference: MeasuredReference | None
    target: DeviceFit | None
    preferred_samplers: dict[int, str]
    sampler_scores: dict[str, dict[int, float]]
    prior: ReferencePrior | None


def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values))


def save(parts: Parts, file: str | PathLike[str] | BinaryIO) -> None:
    ensemble, target, reference = parts.ensemble, parts.target, parts.reference
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
        "measured": None if reference is None else {
            "keys": _joined(reference.table.keys), "devices": list(reference.table.devices),
            "log_ms": _tensor(reference.table.log_ms), "network_keys": _joined(reference.network_keys),
            "network_of_row": _tensor(reference.network_of_row.astype(np.int32)), "dead": _tensor(reference.dead),
        },
        "prior": None if parts.prior is None else {"cov": _tensor(parts.prior.cov),
                                                   "unexplained": _tensor(parts.prior.unexplained_each)},
        "target": None if target is None else _target_state(target),
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
    reference = prior = None
    if version in _TABLE_FORMATS:
        if state["measured"] is not None:
            reference = _reference(state["space"], state["measured"], version)
        if state["prior"] is not None:
            prior = _prior(state["prior"], len(devices))
    return Parts(state["space"], devices, ensemble, state["descriptor_mean"].numpy(), state["descriptor_std"].numpy(),
                 config, reference, _target(state["target"], version), dict(state.get("preferred_samplers") or {}),
                 dict(state.get("sampler_scores") or {}), prior)


def _target_state(target: DeviceFit) -> dict[str, Any]:
    return {
        "name": target.name, "coef": _tensor(target.coef), "cov": _tensor(target.cov), "noise": target.noise,
        "scales": list(target.scales), "samples": target.samples, "per_network": target.per_network,
        "similarity": None if target.similarity is None else _tensor(target.similarity),
        "noise_scale": target.noise_scale, "log_evidence": target.log_evidence,
        "other_reading": None if target.other_reading is None else _target_state(target.other_reading),
        "other_reading_probability": target.other_reading_probability,
    }


def _joined(keys: list[str]) -> str:
    """Keys as one string: unpickling a list of 15,625 strings with `weights_only` took 10x longer."""
    if any("\n" in key for key in keys):
        raise ValueError("an architecture key holds a line break")
    return "\n".join(keys)


def _reference(space_name: str, measured: dict[str, Any], version: str) -> MeasuredReference:
    space = get_space(space_name)
    if version != FORMAT:  # format 4: a list of keys, and the table's networks were not kept
        table = LatencyTable(list(measured["keys"]), list(measured["devices"]), measured["log_ms"].numpy())
        return MeasuredReference.of(space, table)
    table = LatencyTable(measured["keys"].split("\n"), list(measured["devices"]), measured["log_ms"].numpy())
    return MeasuredReference(space, table, measured["network_keys"].split("\n"),
                             measured["network_of_row"].numpy().astype(np.int64), measured["dead"].numpy())


def _prior(prior: dict[str, Any], n_reference: int) -> ReferencePrior:
    unexplained = prior["unexplained"]
    if isinstance(unexplained, torch.Tensor):
        return ReferencePrior(prior["cov"].numpy(), unexplained.numpy())
    # saved before the share was kept per reference device: their mean stands for each
    return ReferencePrior(prior["cov"].numpy(), np.full(n_reference, float(unexplained)))


def _target(target: dict[str, Any] | None, version: str) -> DeviceFit | None:
    if target is None:
        return None
    if version in _TABLE_FORMATS:
        # a format-5 fit saved before the noise was shaped has no similarity (one noise for all),
        # one saved before a device could be read two ways no other reading
        similarity = target.get("similarity")
        return DeviceFit(target["name"], target["coef"].numpy(), target["cov"].numpy(), float(target["noise"]),
                         tuple(target["scales"]), dict(target["samples"]), bool(target["per_network"]),
                         None if similarity is None else similarity.numpy().astype(np.float64),
                         float(target.get("noise_scale", 1.0)), float(target.get("log_evidence", float("nan"))),
                         _target(target.get("other_reading"), version),
                         float(target.get("other_reading_probability", 0.0)))
    # bootstrap fits (n_boot, n_design) and intercepts (n_boot,): the Gaussian they sample
    fits = np.hstack([target["intercept"].numpy()[:, None], target["coef"].numpy()]).astype(np.float64)
    return DeviceFit(target["name"], fits.mean(axis=0), np.cov(fits, rowvar=False), 0.0,
                     tuple(target["penalties"]), dict(target["samples"]), per_network=False)
