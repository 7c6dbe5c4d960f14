"""The latency predictor: reference devices' measured latencies, a network pre-trained on them
to fill what they never measured, and a Bayesian few-shot adaptation to a new device.

What the adaptation regresses on, per architecture, is the reference devices' standardised
log-latency (measured where the reference table has the architecture, the pre-trained
ensemble's prediction elsewhere; `Prediction.measured_share` says which) and a few
whole-architecture descriptors (log MACs, log parameters, op shares: what no reference device
captures). The fit itself is `predictor.adaptation`; the networks `predictor.network` and
`predictor.pretraining`; the file format `predictor.checkpoint`.

One network, one latency: a device onboarded through the farm runs the network its export
builds, so keys that build the same network (`SearchSpace.network_key`) get one prediction
and their samples count once. Devices that timed every key as written (the reference tables)
are adapted with `per_network=None`: whether their dead code cost anything is for the samples
to say, and the predictions average the two readings by their probability
(`LatencyPredictor.adapt`).

Pre-training also settles which sampler should pick a new device's samples, by validation on
the reference devices alone (`predictor.validation`); the winner per sample count is stored as
`preferred_samplers`, and `get_sampler("default")` follows it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from os import PathLike
from typing import BinaryIO

import numpy as np
from scipy.special import expit

from predictor import checkpoint
from predictor.adaptation import (
    BUILT_NETWORK_LOG_ODDS,
    SUSPECT_MIN_SAMPLES,
    DeviceFit,
    ReferencePrior,
    fit_device,
    informative_rows,
    mixture_moments,
    off_log_odds,
    prior_informative_rows,
    reference_prior,
)
from predictor.cost import summary_features
from predictor.network import Ensemble, safe_std
from predictor.pretraining import ProgressCallback, TrainConfig, train_ensemble
from predictor.reference import LatencyTable, MeasuredReference, Row
from predictor.spaces import SearchSpace, get_space

__all__ = ["LatencyPredictor", "Prediction", "TrainConfig"]

#: architectures the prior is learned over when the predictor holds no reference table
PRIOR_SAMPLE = 4000
#: a reading of a device's keys less probable than this is left out of its predictions
NEGLIGIBLE_READING = 1e-3


@dataclass(frozen=True)
class Prediction:
    ms: np.ndarray
    #: one standard deviation, in ms
    std: np.ndarray
    #: per key, the share of the reference latencies the answer rests on that were measured
    #: (1: all read from the reference table; 0: all predicted by the pre-trained network)
    measured_share: np.ndarray


class LatencyPredictor:
    def __init__(
        self,
        space: SearchSpace,
        reference_devices: list[str],
        ensemble: Ensemble,
        descriptor_mean: np.ndarray,
        descriptor_std: np.ndarray,
        config: TrainConfig,
        reference: MeasuredReference | None = None,
        target: DeviceFit | None = None,
        preferred_samplers: Mapping[int, str] | None = None,
        sampler_scores: Mapping[str, Mapping[int, float]] | None = None,
        prior: ReferencePrior | None = None,
    ) -> None:
        self.space = space
        self.reference_devices = reference_devices
        self.ensemble = ensemble
        self.descriptor_mean = descriptor_mean
        self.descriptor_std = descriptor_std
        self.config = config
        #: the reference devices' measured log-latencies (None: an older checkpoint without them)
        self.reference = reference
        self.target = target
        #: validated sample count -> the sampler that adapted best at it on held-out reference devices
        self.preferred_samplers = {int(k): str(v) for k, v in (preferred_samplers or {}).items()}
        #: sampler -> validated sample count -> mean Spearman rho on held-out reference devices
        self.sampler_scores = {str(n): {int(k): float(v) for k, v in per_k.items()}
                               for n, per_k in (sampler_scores or {}).items()}
        self._prior = prior
        #: per `per_network`, the last design computed (keys, design, measured), shared with the
        #: predictors adapted from this one: a bench or a search asks for one design again and again
        self._last_design: dict[bool, tuple[tuple[str, ...], np.ndarray, np.ndarray]] = {}

    # ---- pre-training -----------------------------------------------------------------------

    @classmethod
    def pretrain(
        cls,
        space: SearchSpace | str,
        table: Iterable[Row] | LatencyTable,
        *,
        seed: int = 0,
        config: TrainConfig = TrainConfig(),
        progress: ProgressCallback | None = None,
    ) -> LatencyPredictor:
        """Fit a base predictor on (arch key, device, ms) rows of reference devices only, and
        choose its default sampler by leave-one-reference-device-out validation
        (`config.sampler_folds` folds; see `predictor.validation`)."""
        from predictor.validation import held_out_devices, preferred_samplers, validate_samplers

        space = get_space(space) if isinstance(space, str) else space
        if not isinstance(table, LatencyTable):
            table = LatencyTable.from_rows(space, table)
        n_folds = len(held_out_devices(table.devices, config.sampler_folds, seed))
        fit_config = replace(config, sampler_folds=0)
        fits = [0]

        def fit(fit_table: LatencyTable, fit_seed: int) -> LatencyPredictor:
            offset = fits[0]
            fits[0] += 1
            fit_progress = None
            if progress is not None:
                def fit_progress(done: int, total: int) -> None:
                    progress(offset * total + done, (n_folds + 1) * total)
            return cls.fit(space, fit_table, seed=fit_seed, config=fit_config, progress=fit_progress)

        base = fit(table, seed)
        scores = validate_samplers(space, table, fit, folds=config.sampler_folds, seed=seed)
        base.config = config
        base.preferred_samplers = preferred_samplers(scores)
        base.sampler_scores = scores
        return base

    @classmethod
    def fit(cls, space: SearchSpace, table: LatencyTable, *, seed: int = 0, config: TrainConfig = TrainConfig(),
            progress: ProgressCallback | None = None) -> LatencyPredictor:
        """A base predictor on `table`: its networks, its prior, the table itself (no sampler
        validation)."""
        features = space.features(table.keys).astype(np.float32)
        descriptors = summary_features(space, table.keys, features)
        ensemble = train_ensemble(features, table.log_ms, config, seed, progress)
        predictor = cls(space, table.devices, ensemble, descriptors.mean(axis=0), safe_std(descriptors), config,
                        reference=MeasuredReference.of(space, table))
        predictor._prior = predictor._learn_prior(table.keys)
        return predictor

    def serving(self, space: SearchSpace) -> LatencyPredictor:
        """This base predictor for another graph-encoded space: its networks read the graph
        encoding, whichever space the keys are of, so one pre-trained on the reference spaces'
        exports (the `onnx` space) serves a space with no reference table of its own. The
        measured table holds the exports' keys, not the space's, so it stays behind: every
        reference latency is the networks' prediction (`measured_share` 0)."""
        if not (self.space.graph_encoded and space.graph_encoded):
            raise ValueError(f"a {self.space.name} predictor cannot serve the {space.name} space: "
                             "both must be graph-encoded")
        if self.target is not None:
            raise ValueError("only a base predictor serves another space")
        return LatencyPredictor(space, self.reference_devices, self.ensemble, self.descriptor_mean,
                                self.descriptor_std, self.config, None, None, self.preferred_samplers,
                                self.sampler_scores, self.prior)

    # ---- the design of the adaptation --------------------------------------------------------

    @property
    def measured(self) -> LatencyTable | None:
        return self.reference.table if self.reference is not None else None

    @property
    def prior(self) -> ReferencePrior:
        if self._prior is None:  # an older checkpoint: learn it from the networks' predictions
            self._prior = self._learn_prior(self.space.sample(min(PRIOR_SAMPLE, self.space.size()), seed=0))
        return self._prior

    def _learn_prior(self, keys: Sequence[str]) -> ReferencePrior:
        return reference_prior(self._reference_block(list(keys), per_network=False)[0].astype(np.float64))

    def _keys(self, keys: Sequence[str], per_network: bool) -> list[str]:
        if per_network:
            return [self.space.network_key(key) for key in keys]
        return [self.space.canonical(key) for key in keys]

    def _encoded(self, keys: list[str], per_network: bool) -> list[str]:
        """The keys whose encoding stands for normalised `keys` (`SearchSpace.stand_in`)."""
        return [self.space.stand_in(key) for key in keys] if per_network else keys

    def _reference_block(self, keys: list[str], per_network: bool,
                         features: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Standardised log-latency on each reference device of already normalised `keys`:
        measured where the table has it, else the ensemble mean; and the mask of measured cells."""
        keys = self._encoded(keys, per_network)
        n_reference = len(self.reference_devices)
        if self.reference is not None:
            log_ms = self.reference.log_ms(keys, per_network).astype(np.float64)
        else:
            log_ms = np.full((len(keys), n_reference), np.nan)
        measured = np.isfinite(log_ms)
        block = (log_ms - self.ensemble.log_mean) / self.ensemble.log_std
        gaps = np.flatnonzero(~measured.all(axis=1))  # the networks run only where a table has a gap
        if len(gaps):
            gap_features = self.space.features([keys[i] for i in gaps]) if features is None else features[gaps]
            predicted = self.ensemble.standardised_log_ms(gap_features).mean(axis=0)
            block[gaps] = np.where(measured[gaps], block[gaps], predicted)
        return block, measured

    def design(self, keys: list[str], per_network: bool) -> tuple[np.ndarray, np.ndarray]:
        """Regressors of the adaptation for normalised `keys`: [reference block, descriptors],
        and the mask of measured reference cells. A network encoded by a stand-in
        (`SearchSpace.stand_in`) gets the stand-in's row."""
        memo = tuple(keys)
        last = self._last_design.get(per_network)
        if last is not None and last[0] == memo:
            return last[1], last[2]
        encoded = self._encoded(keys, per_network)
        features = self.space.features(encoded)
        descriptors = summary_features(self.space, encoded, features, width=len(self.descriptor_mean))
        descriptors = (descriptors - self.descriptor_mean) / self.descriptor_std
        block, measured = self._reference_block(keys, per_network, features)
        design = np.hstack([block, descriptors])
        self._last_design[per_network] = (memo, design, measured)
        return design, measured

    # ---- what samplers read (`predictor.samplers.Embedding`) ---------------------------------

    def descriptors(self, keys: Sequence[str]) -> np.ndarray:
        """Everything the adaptation regresses on, per key: what samplers should spread over."""
        return self.design(self._keys(keys, per_network=True), per_network=True)[0]

    def embed(self, keys: Sequence[str]) -> np.ndarray:
        """The architectures as the reference devices see them."""
        return self._reference_block(self._keys(keys, per_network=True), per_network=True)[0]

    def network_key(self, key: str) -> str:
        return self.space.network_key(key)

    # ---- inference --------------------------------------------------------------------------

    def predict(self, keys: Sequence[str], device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Latency (ms) and its uncertainty (ms, one standard deviation) for each key.

        An adapted predictor answers for its target device; a base predictor for any of its
        reference devices, named by `device`.
        """
        prediction = self.prediction(keys, device)
        return prediction.ms, prediction.std

    def prediction(self, keys: Sequence[str], device: str | None = None) -> Prediction:
        """`predict`, with what each answer rests on."""
        if len(keys) == 0:
            return Prediction(np.zeros(0), np.zeros(0), np.zeros(0))
        if device is None or (self.target is not None and device == self.target.name):
            if self.target is None:
                raise ValueError("a base predictor needs `device`: one of its reference devices")
            log_ms, log_var, measured_share = self._target_answer(self.target, keys)
            other = self.target.other_reading
            if other is not None:
                weights = (1 - self.target.other_reading_probability, self.target.other_reading_probability)
                other_log_ms, other_var, other_share = self._target_answer(other, keys)
                log_ms, log_var = mixture_moments(weights, (log_ms, other_log_ms), (log_var, other_var))
                measured_share = weights[0] * measured_share + weights[1] * other_share
            ms = np.exp(log_ms)
            return Prediction(ms, ms * np.sqrt(log_var), measured_share)
        if device not in self.reference_devices:
            raise ValueError(f"{device!r} is not a reference device of this predictor")
        col = self.reference_devices.index(device)
        normalised = self._keys(keys, per_network=False)
        log_ms = np.full(len(normalised), np.nan)
        if self.reference is not None:
            log_ms = self.reference.log_ms(normalised, per_network=False)[:, col].astype(np.float64)
        measured = np.isfinite(log_ms)
        log_std = np.zeros(len(normalised))
        gaps = np.flatnonzero(~measured)  # the networks answer where the table has a gap
        if len(gaps):
            standardised = self.ensemble.standardised_log_ms(self.space.features([normalised[i] for i in gaps]))
            fits = standardised[:, :, col] * self.ensemble.log_std[col] + self.ensemble.log_mean[col]  # (members, n)
            log_ms[gaps], log_std[gaps] = fits.mean(axis=0), fits.std(axis=0)
        ms = np.exp(log_ms)
        return Prediction(ms, ms * log_std, measured.astype(np.float64))

    def _target_answer(self, fit: DeviceFit, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per key, `fit`'s posterior mean and variance of log-latency and the measured share of
        the reference latencies they rest on; one answer per distinct network (per key for a fit
        read as written), so equal keys get equal predictions."""
        positions: dict[str, int] = {}
        inverse = np.asarray([positions.setdefault(key, len(positions)) for key in self._keys(keys, fit.per_network)],
                             dtype=np.int64)
        design, measured = self.design(list(positions), fit.per_network)
        log_ms, log_std = fit.log_ms(design)
        return log_ms[inverse], log_std[inverse] ** 2, measured.mean(axis=1)[inverse]

    # ---- few-shot adaptation ----------------------------------------------------------------

    def adapt(self, samples: Mapping[str, float], name: str = "target", *,
              per_network: bool | None = True) -> LatencyPredictor:
        """A predictor for a new device from a few measured {arch key: ms} samples.

        `per_network`: True, the device ran the networks the keys build (as the farm's exports
        do), so samples of keys building one network are one measurement of it (their
        log-mean); False, it timed each key as written and its dead code cost what the reference
        devices' did; None, it timed each key as written and whether its dead code cost anything
        is for the samples to say: the device is fitted both ways (per network, and as
        written), the two readings are weighed by the samples' evidence at the prior odds
        `BUILT_NETWORK_LOG_ODDS`, and predictions are their mixture (`DeviceFit.other_reading`;
        the target is the likelier reading's fit, which active learning and `suspect_samples`
        read). The test needs samples of distinct networks (what samplers draw); others are read
        as written.
        """
        if per_network is not None:
            return self._adapt(samples, name, per_network)
        as_written = self._adapt(samples, name, per_network=False)
        if len(set(self._keys(list(samples), per_network=True))) < len(samples):
            return as_written
        built = self._adapt(samples, name, per_network=True)
        assert built.target is not None and as_written.target is not None  # _adapt always fits
        built_probability = float(expit(built.target.log_evidence + BUILT_NETWORK_LOG_ODDS
                                        - as_written.target.log_evidence))
        likelier, other = (built, as_written) if built_probability > 0.5 else (as_written, built)
        weight = min(built_probability, 1 - built_probability)
        if weight < NEGLIGIBLE_READING:
            return likelier
        assert likelier.target is not None and other.target is not None
        likelier.target = replace(likelier.target, other_reading=other.target, other_reading_probability=weight)
        return likelier

    def _adapt(self, samples: Mapping[str, float], name: str, per_network: bool) -> LatencyPredictor:
        grouped: dict[str, list[float]] = {}
        for key, ms in samples.items():
            if not (np.isfinite(ms) and ms > 0):
                raise ValueError("sample latencies must be positive finite numbers")
            grouped.setdefault(self._keys([key], per_network)[0], []).append(float(np.log(ms)))
        if len(grouped) < 2:
            raise ValueError("adaptation needs at least 2 measured architectures (distinct networks)")
        keys = list(grouped)
        y = np.asarray([np.mean(grouped[key]) for key in keys])
        design, _ = self.design(keys, per_network)
        fit = fit_device(name, design, y, len(self.reference_devices), self.prior,
                         dict(zip(keys, map(float, np.exp(y)))), per_network=per_network)
        adapted = LatencyPredictor(
            self.space, self.reference_devices, self.ensemble, self.descriptor_mean, self.descriptor_std,
            self.config, self.reference, fit, self.preferred_samplers, self.sampler_scores, self._prior,
        )
        adapted._last_design = self._last_design
        return adapted

    def most_informative(self, keys: Sequence[str], n: int) -> list[str]:
        """Of `keys`, up to `n` to measure next: one key per network (per key for a target that
        timed keys as written) that no sample measured yet, picked greedily for how much the
        measurement would cut the uncertainty over those networks. An adapted predictor reads
        its posterior (`predictor.adaptation.informative_rows`); a base predictor, the prior a
        new device starts from (`predictor.adaptation.prior_informative_rows`)."""
        per_network = self.target.per_network if self.target is not None else True
        measured = self.target.samples if self.target is not None else {}
        first: dict[str, str] = {}
        for key, normalised in zip(keys, self._keys(keys, per_network)):
            if normalised not in measured:
                first.setdefault(normalised, key)
        unmeasured = list(first)
        if not unmeasured or n < 1:
            return []
        design, _ = self.design(unmeasured, per_network)
        if self.target is None:
            rows = prior_informative_rows(self.prior, design, len(self.reference_devices), n)
        else:
            rows = informative_rows(self.target, design, n)
        return [first[unmeasured[i]] for i in rows]

    def suspect_samples(self) -> list[str]:
        """The adapted device's samples (normalised keys, as `target.samples` holds them) likelier
        mis-measured than not (`predictor.adaptation.off_log_odds`), each against the fit to the
        others with its scales chosen again: a bad sample cannot hide by widening the noise it is
        judged by. Worth measuring again, not dropping: where the model is far from the device,
        good samples can be suspect too. None below `SUSPECT_MIN_SAMPLES` samples."""
        if self.target is None:
            raise ValueError("only an adapted predictor has samples")
        samples, per_network = self.target.samples, self.target.per_network
        if len(samples) < SUSPECT_MIN_SAMPLES:
            return []
        keys = list(samples)
        design, _ = self.design(keys, per_network)
        residual, variance = np.zeros(len(keys)), np.zeros(len(keys))
        for i, key in enumerate(keys):
            others = self._adapt({k: ms for k, ms in samples.items() if k != key}, self.target.name, per_network)
            assert others.target is not None  # _adapt always fits
            mean, std = others.target.log_ms(design[i:i + 1])
            residual[i], variance[i] = np.log(samples[key]) - mean[0], std[0] ** 2
        return [key for key, odds in zip(keys, off_log_odds(residual, variance)) if odds > 0]

    # ---- persistence ------------------------------------------------------------------------

    def save(self, file: str | PathLike[str] | BinaryIO) -> None:
        checkpoint.save(checkpoint.Parts(
            self.space.name, self.reference_devices, self.ensemble, self.descriptor_mean, self.descriptor_std,
            self.config, self.reference, self.target, self.preferred_samplers, self.sampler_scores, self._prior,
        ), file)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        self.save(buffer)
        return buffer.getvalue()

    @classmethod
    def load(cls, file: str | PathLike[str] | BinaryIO | bytes) -> LatencyPredictor:
        """Load a checkpoint of this or an older format (`predictor.checkpoint`)."""
        parts = checkpoint.load(file)
        return cls(get_space(parts.space), parts.reference_devices, parts.ensemble, parts.descriptor_mean,
                   parts.descriptor_std, parts.config, parts.reference, parts.target, parts.preferred_samplers,
                   parts.sampler_scores, parts.prior)
