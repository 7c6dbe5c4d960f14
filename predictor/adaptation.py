"""Few-shot adaptation: a new device's log-latency as a Bayesian linear model of the reference
devices' latencies and a few architecture descriptors.

The design row of an architecture is [reference devices' standardised log-latency (measured
where the reference table has it, else predicted by the pre-trained network), descriptors (a
few whole-architecture summaries and costs of the key as read,
`predictor.cost.summary_features`)]. A
new device's log-latency is

    y = a + b * (reference @ m) + reference @ w + descriptors @ v + noise

with a free (a flat prior), w ~ N(0, tau_r^2 * prior_cov), v ~ N(0, tau_d^2 * I) and noise ~
N(0, sigma^2). m weights the reference devices by how well they correlate with the samples (a
softmax, `SIMILARITY_SHARPNESS`); prior_cov is learned from the reference devices themselves
(`reference_prior`): each reference device regressed on the others gives one weight vector, the
kind of weights a new device is likely to have. Three hypotheses (`HYPOTHESES`): the device is
like the references, b ~ N(0, var(y) / var(reference @ m)) (a slope that explains all the
samples' variance is one standard deviation out); unlike every one of them, b = 0; or not
explained by them at all, b = 0 and w = 0 (the descriptors alone). Under each, tau_r, tau_d and
sigma are chosen by the marginal likelihood of the samples (empirical Bayes), so few samples
keep the fit near the prior and more samples move it only as far as they support; the
hypotheses are weighed by that likelihood (even odds a priori; "like" also pays the Occam
factor of having picked its direction among the reference devices, `_direction_log_factor`),
and the fit is their mixture,
kept as one Gaussian (its mean and covariance), which gives the uncertainty, noise included, for
every architecture. m is fitted to the very samples it is scored on, so
with few samples some reference always looks like the device; only a proper prior on b and the
explicit alternative let the evidence say that none is (a flat prior on b made the comparison
depend on the prior's width alone). The uncertainty has a floor: where the
chosen sigma^2 is below the share of variance the other reference devices leave unexplained in
the reference devices like the target (weighted by m), times the samples' variance, every
variance of the posterior is scaled up until it is not (a new device is not assumed better
explained than the references like it are). The scaling leaves the posterior mean as it was:
the floor bounds what the model claims to know, not which model the evidence picks.

The noise is not the same for every architecture: its variance scales with how much the
reference devices most like the target disagree on the architecture (`disagreement`, the
similarity-weighted variance of its standardised latency across them, to the power
`NOISE_SHAPE_EXPONENT`, normalised to mean 1 over the samples). The fit itself stays
homoscedastic, so the predicted latencies are those of the plain model; only the uncertainty
is shaped, and with it the picks of active learning.

How each setting was chosen, on held-out reference devices only, with the validation figures
behind it and what was tried and rejected: docs/adaptation.md.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import logsumexp

#: candidate prior scales (variances) of the reference and descriptor blocks, and noise variances
#: of log-latency; 0 leaves a block out
REFERENCE_SCALES = (0.0, *np.logspace(-3, 1, 9).tolist())
DESCRIPTOR_SCALES = (0.0, *np.logspace(-4, 1, 6).tolist())
NOISE_VARIANCES = tuple(np.logspace(-5, -1, 9).tolist())
#: what a new device may be, at even odds a priori: like the reference devices (its log-latency
#: follows their similarity-weighted mean), unlike every one of them, or not explained by them
#: at all (the reference block left out)
HYPOTHESES = ("like", "unlike", "descriptors")
#: prior log-odds that a device which timed keys as written ran only the networks they build
#: (its dead code cost nothing) against its charging for dead code, when the samples are left to
#: test it (`LatencyPredictor.adapt(per_network=None)`): the reference tables' own share, 13 of
#: NB201's 40 devices
BUILT_NETWORK_LOG_ODDS = float(np.log(13 / 27))
#: the precision that holds a left-out coefficient at 0
LEFT_OUT = 1e12
#: prior variance of the intercept; wide against log-latency offsets of a few units
FREE_VARIANCE = 1e2
#: how sharply the prior mean favours the reference devices best correlated with the samples
SIMILARITY_SHARPNESS = 50.0
#: ridge penalty of the reference-on-reference regressions that learn the prior (on the
#: correlation scale: standardised latencies)
PRIOR_RIDGE = 1e-2
#: the noise variance of an architecture grows as this power of the reference devices'
#: disagreement on it
NOISE_SHAPE_EXPONENT = 0.5
#: the least disagreement a row is given (standardised log-latency variance)
DISAGREEMENT_FLOOR = 1e-4
#: added to the learned prior covariance's diagonal, as a share of its mean variance, so no
#: direction of the reference block is ruled out
PRIOR_FLOOR = 0.1
#: a sample is suspect (`off_log_odds`, `LatencyPredictor.suspect_samples`) when, at these prior
#: odds of a measurement being off and this log-latency variance of how far off, its residual
#: from the fit to the other samples makes it likelier off than not; with fewer samples than the
#: last, that fit's noise is not known well enough to tell
OFF_PRIOR = 0.05
OFF_VARIANCE = 1.0
SUSPECT_MIN_SAMPLES = 10


@dataclass(frozen=True)
class ReferencePrior:
    """The spread of a device's weights over the reference devices (standardised latencies)."""

    cov: np.ndarray  # (n_ref, n_ref)
    #: per reference device, the share of its variance the others leave unexplained
    unexplained_each: np.ndarray  # (n_ref,)

    @property
    def unexplained(self) -> float:
        """The share of a reference device's variance the others leave unexplained, on average."""
        return float(np.mean(self.unexplained_each))

    def unexplained_like(self, weights: np.ndarray) -> float:
        """The `weights`-weighted share: how well a device like those references is explained."""
        return float(weights @ self.unexplained_each)


@dataclass(frozen=True)
class DeviceFit:
    """A target device as a Gaussian posterior over the coefficients of [1, design row]."""

    name: str
    coef: np.ndarray  # (1 + n_design,) intercept first
    cov: np.ndarray  # (1 + n_design, 1 + n_design)
    noise: float  # variance of log-latency the model does not explain
    #: (reference scale, descriptor scale, noise variance) chosen by marginal likelihood (under
    #: the likelier hypothesis; before the floor's scaling)
    scales: tuple[float, ...]
    samples: dict[str, float]
    #: whether the device runs the built network (farm exports), so keys building one network
    #: share a prediction; False for devices that timed every key as written
    per_network: bool = True
    #: the similarity weights the noise shape reads the reference devices' disagreement with,
    #: and the shape's mean over the samples; None: one noise for all (older checkpoints)
    similarity: np.ndarray | None = None
    noise_scale: float = 1.0
    #: log marginal likelihood of the samples under the fit's hypotheses, their scales integrated
    #: over the grid (evenly), up to a constant that only the samples set (so fits of the same
    #: samples compare); NaN: not known (older checkpoints)
    log_evidence: float = float("nan")
    #: for a device whose dead code's cost the samples were left to tell
    #: (`LatencyPredictor.adapt(per_network=None)`): its fit under the other reading of the keys
    #: and that reading's posterior probability; predictions are the two readings' mixture.
    #: None: the device is read one way only
    other_reading: DeviceFit | None = None
    other_reading_probability: float = 0.0

    def noise_of(self, design: np.ndarray) -> np.ndarray:
        """The variance of log-latency the model does not explain, per design row."""
        if self.similarity is None:
            return np.full(len(design), self.noise)
        shape = disagreement(design[:, :len(self.similarity)], self.similarity) ** NOISE_SHAPE_EXPONENT
        return self.noise * shape / self.noise_scale

    def log_ms(self, design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of log-latency for each design row."""
        z = np.hstack([np.ones((len(design), 1)), design])
        mean = z @ self.coef
        var = ((z @ self.cov) * z).sum(axis=1) + self.noise_of(design)
        return mean, np.sqrt(np.clip(var, 0.0, None))


def reference_prior(reference: np.ndarray, ridge: float = PRIOR_RIDGE) -> ReferencePrior:
    """Each reference device's standardised log-latency regressed (ridge) on the others', over
    the architectures of `reference` (n, n_ref, no NaN): the covariance of the weight vectors
    (each with a 0 for the device itself) and the share of variance they leave unexplained."""
    n, n_ref = reference.shape
    x = reference - reference.mean(axis=0)
    gram = x.T @ x / n
    weights = np.zeros((n_ref, n_ref))
    for j in range(n_ref):
        others = np.flatnonzero(np.arange(n_ref) != j)
        weights[j, others] = np.linalg.solve(gram[np.ix_(others, others)] + ridge * np.eye(len(others)),
                                             gram[others, j])
    cov = np.cov(weights, rowvar=False) if n_ref > 2 else np.eye(n_ref)
    cov = cov + PRIOR_FLOOR * np.trace(cov) / n_ref * np.eye(n_ref)
    residual = x - x @ weights.T
    return ReferencePrior(cov, residual.var(axis=0) / np.clip(x.var(axis=0), 1e-12, None))


def similarity_weights(reference: np.ndarray, y: np.ndarray, sharpness: float = SIMILARITY_SHARPNESS) -> np.ndarray:
    """Softmax over the reference devices of their correlation with the samples' log-latency."""
    rc = reference - reference.mean(axis=0)
    yc = y - y.mean()
    correlation = (rc.T @ yc) / np.clip(np.linalg.norm(rc, axis=0) * np.linalg.norm(yc), 1e-12, None)
    logits = sharpness * correlation
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def disagreement(reference: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row, the `weights`-weighted variance of the reference devices' standardised
    log-latency: how far the devices that count apart on the architecture. A floor keeps rows
    the devices agree on exactly from claiming no noise at all."""
    centre = reference @ weights
    spread = ((reference - centre[:, None]) ** 2) @ weights
    return np.clip(spread, DISAGREEMENT_FLOOR, None)


class _Hypothesis(NamedTuple):
    """One prior direction of `fit_device`, with the scales its evidence chose."""

    log_odds: float  # log evidence at the chosen scales (the hypotheses are at even odds a priori)
    #: log evidence averaged over the scale grid: the marginal likelihood, nothing fitted
    log_marginal: float
    direction_weights: np.ndarray  # over the reference devices; zeros: no direction
    slope_variance: float
    tau_r: float
    tau_d: float
    sigma: float


def fit_device(name: str, design: np.ndarray, y: np.ndarray, n_reference: int, prior: ReferencePrior,
               samples: dict[str, float], *, per_network: bool = True) -> DeviceFit:
    """The posterior for a device from its samples' design rows and measured log-latencies: the
    mixture, by their evidence, of the `HYPOTHESES` on the device, as one Gaussian (its mean and
    covariance)."""
    n = len(y)
    reference, descriptors = design[:, :n_reference], design[:, n_reference:]
    mean_weights = similarity_weights(reference, y)
    kernels = np.stack([reference @ prior.cov @ reference.T, descriptors @ descriptors.T, np.eye(n)])
    grid = np.asarray([scales for scales in itertools.product(REFERENCE_SCALES, DESCRIPTOR_SCALES, NOISE_VARIANCES)
                       if descriptors.shape[1] or scales[1] == 0])
    hypotheses = []
    for hypothesis in HYPOTHESES:
        direction_weights = mean_weights if hypothesis == "like" else np.zeros(n_reference)
        scales = grid[grid[:, 0] == 0] if hypothesis == "descriptors" else grid
        slope_variances, free = _direction_priors((reference @ direction_weights)[:, None], y)
        slope_variance = float(slope_variances[0])
        evidence = _log_evidence(free[0] + np.einsum("cb,bij->cij", scales, kernels), y - y.mean())
        best = int(np.argmax(evidence))
        # "like" took its direction from the samples: weigh it by how many references it had to
        # choose among
        picked = _direction_log_factor(reference, y, kernels, scales[best]) if hypothesis == "like" else 0.0
        hypotheses.append(_Hypothesis(float(evidence[best]) + picked,
                                      float(logsumexp(evidence) - np.log(len(evidence))),
                                      direction_weights, slope_variance, *map(float, scales[best])))
    log_odds = np.asarray([h.log_odds for h in hypotheses])
    probability = np.exp(log_odds - log_odds.max())
    probability /= probability.sum()
    fits = [_posterior(design, y, n_reference, h, prior) for h in hypotheses]
    coef, cov = mixture_moments(probability, [mean for mean, _ in fits], [fit_cov for _, fit_cov in fits])
    sigma = float(probability @ [h.sigma for h in hypotheses])
    # the floor on the noise scales every variance of the model alike: the uncertainty grows, the
    # mean stays the one the evidence chose
    floor = prior.unexplained_like(mean_weights) * float(np.var(y, ddof=1))
    inflation = max(1.0, floor / sigma)
    noise_scale = float(np.mean(disagreement(reference, mean_weights) ** NOISE_SHAPE_EXPONENT))
    likeliest = hypotheses[int(np.argmax(probability))]
    return DeviceFit(name, coef, inflation * cov, inflation * sigma,
                     (likeliest.tau_r, likeliest.tau_d, likeliest.sigma), samples, per_network, mean_weights,
                     noise_scale, float(logsumexp([h.log_marginal for h in hypotheses]) - np.log(len(hypotheses))))


def mixture_moments(probability: Sequence[float], means: Sequence[np.ndarray],
                    covariances: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and covariance of a mixture of Gaussians weighted by `probability`: each
    component's covariance plus the spread of its mean about the mixture's. `covariances` are
    matrices, or for means taken element by element, variances."""
    mean = sum(p * m for p, m in zip(probability, means))
    spread = np.outer if np.ndim(covariances[0]) == 2 else np.multiply
    cov = sum(p * (c + spread(m - mean, m - mean)) for p, m, c in zip(probability, means, covariances))
    return np.asarray(mean), np.asarray(cov)


def _direction_log_factor(reference: np.ndarray, y: np.ndarray, kernels: np.ndarray, scales: np.ndarray) -> float:
    """The Occam factor of a prior direction picked from the samples among the reference
    devices: log of the mean, over the devices, of each one's evidence as the direction alone (at
    `scales`), relative to the best one's; about -log(n_ref) when one device alone explains the
    samples, 0 when every device explains them alike."""
    _, free = _direction_priors(reference[:, reference.var(axis=0) > 0], y)
    evidence = _log_evidence(free + np.einsum("b,bij->ij", scales, kernels), y - y.mean())
    if not np.isfinite(evidence).any():
        return 0.0
    return float(logsumexp(evidence) - evidence.max() - np.log(len(evidence)))


def _direction_priors(directions: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each column of `directions` (n, c) taken as the prior direction: the variance of its
    slope (one that explains all of the samples' variance is one standard deviation out; 0 for a
    constant column) and the covariance of the samples that the free intercept and the slope
    give, (c, n, n)."""
    spread = directions.var(axis=0)
    slope_variances = np.divide(float(np.var(y)), spread, out=np.zeros_like(spread), where=spread > 0)
    return slope_variances, FREE_VARIANCE + slope_variances[:, None, None] * np.einsum("ic,jc->cij", directions,
                                                                                         directions)


def _posterior(design: np.ndarray, y: np.ndarray, n_reference: int, hypothesis: _Hypothesis,
               prior: ReferencePrior) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the [1, design] coefficients under one hypothesis, its prior
    direction (`reference @ direction_weights`, its slope ~ N(0, slope_variance)) folded into the
    reference weights."""
    n, n_design = design.shape
    weights = hypothesis.direction_weights
    # weight space over [1, prior direction, reference, descriptors]; a variance of 0 is left out
    z = np.hstack([np.ones((n, 1)), (design[:, :n_reference] @ weights)[:, None], design])
    variances = np.r_[FREE_VARIANCE, hypothesis.slope_variance, np.zeros(n_reference),
                      np.full(n_design - n_reference, hypothesis.tau_d)]
    precision = np.diag(1.0 / np.where(variances > 0, variances, 1.0 / LEFT_OUT))
    ref = slice(2, 2 + n_reference)
    precision[ref, ref] = (np.linalg.inv(prior.cov) / hypothesis.tau_r if hypothesis.tau_r > 0
                           else np.eye(n_reference) * LEFT_OUT)
    ym = y.mean()
    posterior_cov = np.linalg.inv(z.T @ z / hypothesis.sigma + precision)
    posterior_mean = posterior_cov @ z.T @ (y - ym) / hypothesis.sigma
    posterior_mean[0] += ym
    fold = np.zeros((1 + n_design, z.shape[1]))
    fold[0, 0] = 1.0
    fold[1:, 2:] = np.eye(n_design)
    fold[1:1 + n_reference, 1] = weights
    return fold @ posterior_mean, fold @ posterior_cov @ fold.T


def _log_evidence(covariances: np.ndarray, yc: np.ndarray) -> np.ndarray:
    """log N(yc; 0, C) up to a constant, for each of a stack of covariances C; -inf where one is
    not numerically positive definite."""
    scored = np.ones(len(covariances), dtype=bool)
    try:
        chol = np.linalg.cholesky(covariances)
    except np.linalg.LinAlgError:  # numpy fails the whole batch for one matrix: score the others
        scored = np.asarray([_positive_definite(c) for c in covariances])
        chol = np.linalg.cholesky(covariances[scored])
    alpha = np.linalg.solve(chol, np.broadcast_to(yc, chol.shape[:2])[..., None])[..., 0]
    evidence = np.full(len(covariances), -np.inf)
    evidence[scored] = -0.5 * (alpha**2).sum(axis=1) - np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
    return evidence


def _positive_definite(matrix: np.ndarray) -> bool:
    try:
        np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        return False
    return True


def informative_rows(fit: DeviceFit, design: np.ndarray, n: int) -> list[int]:
    """`n` rows of `design` to measure next on the fitted device: those that most cut its
    posterior variance (`_most_variance_cut`). A second pick of the same row gains little, so a
    batch spreads over the rows the model is unsure of, and the rows the samples pin down are
    left alone."""
    z = np.hstack([np.ones((len(design), 1)), design])
    return _most_variance_cut(z, fit.cov, fit.noise_of(design), n)


def off_log_odds(residual: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Log-odds that a measurement is off, from its log-latency `residual` against a prediction
    made without it and that prediction's `variance` (noise included): off by a spread of
    `OFF_VARIANCE` at prior odds `OFF_PRIOR`, against within the prediction's own spread."""
    return (np.log(OFF_PRIOR / (1 - OFF_PRIOR)) + 0.5 * np.log(variance / (variance + OFF_VARIANCE))
            + 0.5 * residual**2 * (1 / variance - 1 / (variance + OFF_VARIANCE)))


def prior_informative_rows(prior: ReferencePrior, design: np.ndarray, n_reference: int, n: int) -> list[int]:
    """`n` rows of `design` to measure first on a new device: those that most cut the
    uncertainty of a linear model on the design before any sample (Bayesian experimental
    design; the model is `prior_design`'s)."""
    return _most_variance_cut(*prior_design(prior, design, n_reference), n)


def prior_design(prior: ReferencePrior, design: np.ndarray,
                 n_reference: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A linear model of a new device on `design` before any sample: (the rows, centred since
    the intercept is free; the prior covariance of their weights; the noise variance per row).

    It is the adaptation's prior without what only samples can tell: the reference weights
    spread as `prior.cov` says, the descriptors isotropically, each block given the same prior
    variance of log-latency over the rows (neither favoured); the noise is the share of variance
    the reference devices leave unexplained in one another (`prior.unexplained`)."""
    z = design - design.mean(axis=0)
    reference, descriptors = z[:, :n_reference], z[:, n_reference:]
    cov = np.zeros((z.shape[1], z.shape[1]))
    cov[:n_reference, :n_reference] = prior.cov
    reference_signal = float(np.mean(((reference @ prior.cov) * reference).sum(axis=1)))
    descriptor_signal = float(np.mean((descriptors**2).sum(axis=1)))
    signal = reference_signal
    if descriptor_signal > 0:
        cov[n_reference:, n_reference:] = reference_signal / descriptor_signal * np.eye(z.shape[1] - n_reference)
        signal += reference_signal  # the descriptors' block, scaled to match
    # bounded away from 0 (a row measured once must not leave nothing to learn) and from 1
    unexplained = float(np.clip(prior.unexplained, 1e-3, 0.5))
    return z, cov, np.full(len(z), signal * unexplained / (1 - unexplained))


def _most_variance_cut(z: np.ndarray, cov: np.ndarray, noise: np.ndarray, n: int) -> list[int]:
    """Greedily, `n` rows of `z` whose measurement (with variance `noise` per row) most reduces
    the variance of `z @ w`, w ~ N(., cov), summed over every row, given the picks before it: a
    measurement of row c cuts row i's variance by (z_i S z_c)^2 / (z_c S z_c + noise_c); summed
    over i, z_c S Z'Z S z_c / (...)."""
    gram = z.T @ z
    cov = cov.copy()
    chosen: list[int] = []
    for _ in range(min(n, len(z))):
        own = ((z @ cov) * z).sum(axis=1) + noise  # the variance of measuring each row
        gain = ((z @ (cov @ gram @ cov)) * z).sum(axis=1) / own
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        shift = cov @ z[best]
        cov = cov - np.outer(shift, shift) / own[best]
    return chosen
