"""Few-shot adaptation: a new device's log-latency as a Bayesian linear model of the reference
devices' latencies and a few architecture descriptors.

The design row of an architecture is [reference devices' standardised log-latency (measured
where the reference table has it, else predicted by the pre-trained network), descriptors]. A
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
factor of having picked its direction among the reference devices, see below), and the fit is their mixture,
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

Chosen on the leave-one-device-out bench (10 NB201 devices, k = 5/10/20, 3 seeds; see
docs/bench/lodo.md): the similarity mean (sharpness 50) over the learned mean of the
reference regressions raised mean rho from 0.828/0.923/0.925 to 0.904/0.937/0.953 (sharpness
20: 0.891/0.934/0.951); a plain ridge on the same reference latencies scored 0.860/0.926/0.930.
The noise shape was chosen on the same bench (every 4th NB201 device, k = 5/10/20/50, 3
seeds). Spearman of the predicted std against |error| rose from 0.21/0.28/0.26/0.29 with one
noise for all to 0.35/0.43/0.39/0.33 with exponent 0.5, and the 90 % interval's coverage at
k=20 from 0.86 to 0.88; exponent 1 gave 0.34/0.41/0.37/0.31 (coverage 0.91), 0.25 gave
0.33/0.44/0.40/0.34 (coverage 0.87). Rejected on it: fitting with the shaped noise too, its
exponent chosen by marginal likelihood (rho 0.933 against 0.935 at k=20) or fixed at 0.5
(0.935, calibration 0.40: no better); shaping by the reference devices' leave-one-out
residuals instead (calibration 0.27 at k=20); choosing by marginal likelihood between the
learned prior covariance and an isotropic one (rho +0.001).

The floor as a scale, not a bound on the noise the evidence may choose, was chosen on the
same bench (15 NB201 and 11 FBNet devices: every 4th of each space's sorted list, the names
pooled across the two spaces; k = 5/10/20/50, 3 seeds) and on
`benchmarks/unlike_references.py` (few references, none like the target; reference devices
only). With the floor inside the evidence, sigma^2 sat on it, and no block that explains more
could win. NB201 mean rho went from 0.912/0.926/0.944/0.951 to 0.911/0.935/0.947/0.955,
FBNet from 0.864/0.920/0.926/0.933 to 0.870/0.919/0.926/0.935, the 90 % interval's coverage
at k=20 from 0.886 to 0.925 (NB201) and 0.949 to 0.954 (FBNet), Spearman(std, |error|) at
k=20 from 0.371 to 0.392 (NB201); unlike references, targets that charge for dead code from
0.723/0.743/0.786/0.830 to 0.728/0.767/0.807/0.858, GPUs from non-GPUs and the reverse from
0.854/0.887/0.911/0.924 to 0.823/0.894/0.916/0.924 (k=5 lower). No floor at all (with
the op block below) gave the same means with a coverage of 0.74 at k=20 on NB201. Rejected on
the same two benches:
- an op block (the space's standardised one-hot encoding, its own scale by evidence): within
  0.005 of the above everywhere, rarely chosen;
- the scales chosen by leave-one-out predictive likelihood instead of the evidence: 0.933
  against 0.947 on NB201 at k=20, 0.841/0.908 against 0.894/0.924 for GPUs unlike references
  at k = 10/50;
- no similarity mean (b = 0; m is fitted to the same samples, so the evidence overrates it
  where no reference is like the target): unlike references, dead-code targets rose to
  0.790/0.826/0.841/0.867, but NB201 fell to 0.756/0.893/0.920/0.942 and FBNet to
  0.641/0.872/0.908/0.931;
- choosing per device between the two by leave-one-out error: dead-code targets
  0.723/0.791/0.832/0.867, but NB201 0.909/0.918/0.943/0.950 and FBNet 0.844/0.895/0.917/0.934.

The two hypotheses, the proper prior on b and their even odds were chosen on the same two
benches, after the floor above. NB201 mean rho 0.912/0.936/0.947/0.955 (one hypothesis, a flat
b: 0.911/0.935/0.947/0.955), FBNet 0.863/0.917/0.926/0.935 (0.870/0.919/0.926/0.935); unlike
references, dead-code targets 0.751/0.791/0.818/0.862 (0.728/0.767/0.807/0.858), GPUs from
non-GPUs and the reverse 0.826/0.901/0.917/0.925 (0.823/0.894/0.916/0.924). Tried and rejected:
- the proper prior on b alone, no alternative: dead-code targets 0.735/0.774/0.812/0.859;
- odds of 0.9 for "like the references": 0.738/0.778/0.813/0.859 there, LODO within 0.005;
- the alternative with b's flat prior: at k=5, NB201 0.889 and FBNet 0.772 at even odds, FBNet
  0.845 at 0.9 (the flat prior's Occam factor hands few samples to "unlike");
- one hypothesis per reference device (each alone as the prior mean) besides "unlike": k=5
  NB201 0.839, FBNet 0.670; with the similarity mean as a third, 0.893 and 0.775;
- log MACs as the prior direction of a third hypothesis (a third of the odds each): within
  0.007 of the above on every figure of both benches;
- "unlike" with a prior direction of its own, the descriptors' regression of the average
  reference device (instead of none, or beside it at a quarter of the odds each): LODO within
  0.005, dead-code targets 0.744/0.780/0.804/0.856 and 0.748/0.785/0.809/0.859;
- the similarity sharpness, checked again under the two hypotheses: 25 gave NB201
  0.914/0.936/0.945/0.952 and FBNet 0.875/0.917/0.928/0.938, 100 gave 0.907/0.936/0.944/0.955
  and 0.851/0.912/0.923/0.933; unlike references, both within 0.005 of 50.

Every figure above was measured with stratified samples. The default samples are now the design
sampler's (`predictor.samplers.DesignSampler`, chosen on the same benches after the steps above,
its figures there): the picks that most cut the uncertainty of this model's prior
(`prior_informative_rows`).

The floor's share was first the mean over all reference devices. Weighting it by m instead was
chosen on a LODO subset (every 4th of the pooled, sorted NB201 and FBNet device names: 9 NB201
and 8 FBNet targets; design samples, 3 seeds) and the unlike-references
bench: the 90 % interval's coverage at k=20 went from 0.977 to 0.933 on FBNet (one device's
errors: 0.0001 in squared log-latency against a floored noise of 0.0023) and stayed 0.924 on
NB201; unlike references, from 0.962 to 0.939 (dead-code targets) and 0.940 to 0.919 (GPUs).
No rho moves: the floor scales the uncertainty only. Rejected on the same benches: the median
share (coverage 0.906 FBNet, 0.924 NB201, 0.955 and 0.920 unlike); averaging the posterior over
the whole scale grid by evidence instead of the likeliest point, evenly over the grid (NB201
rho at k=5 0.953 against 0.946, GPUs unlike references 0.907 against 0.884, but dead-code
targets at k=10 0.870 against 0.872, and the synthetic unlike-every-reference test of
tests/predictor/test_adaptation.py fell from 0.98 to 0.83 mean rho) or with even odds on
leaving each block out (0.952 and 0.903 at k=5, the synthetic test 0.89, dead-code targets at
k=10 0.860); a prior on the descriptor weights learned from the reference devices' own
descriptor regressions (dead-code targets 0.753/0.850/0.883/0.922 against
0.773/0.872/0.903/0.925).

The third hypothesis (the reference block left out, the descriptors alone) was added last, on
the same LODO subset and on the unlike-references bench with every target and 3 seeds: LODO
within 0.001 of the two hypotheses on every figure (NB201 0.946/0.964/0.964/0.976, FBNet
0.955/0.963/0.972/0.979 at k = 5/10/20/50); unlike references, dead-code targets from
0.793/0.871/0.919/0.940 to 0.803/0.877/0.920/0.941, GPUs from non-GPUs and the reverse from
0.825/0.914/0.937/0.945 to 0.828/0.917/0.938/0.945. Rejected on the same benches: the third
hypothesis in place of "unlike" (dead-code targets 0.794/0.873/0.919/0.940, GPUs
0.830/0.916/0.937/0.944); scoring "like" by evidence with m fitted to the other samples for
each sample's row (a leave-one-out direction, so the evidence is not flattered by a direction
picked on the same samples): NB201 at k=5 0.941 against 0.946, GPUs unlike references
0.821/0.910/0.937/0.946.

The descriptor scales reached 0.1 until the cross-space bench (`latfarm bench cross-space`:
FBNet's devices held out, the graph-level predictor pre-trained on the other spaces) showed the
evidence choosing that cap under every hypothesis on a device (gold_6226: rho 0.869 against the
FLOPs ridge's 0.902; with the grid to 10, 0.917). The wider grid changed no figure of the LODO
subset or of the unlike-references bench (every target, 3 seeds) in the third decimal.

A device that timed every key as written (a reference table's) may have charged for dead code
or run only the built network; the NB201 tables hold both kinds. Read as written, a device of
the second kind adapted from references of the first is told that dead code costs what it cost
them. So the samples test it (`LatencyPredictor.adapt(per_network=None)`, what the benches
use): the fit on the reference devices' per-network latencies is kept when its marginal
likelihood (`DeviceFit.log_evidence`), times the prior odds (`BUILT_NETWORK_LOG_ODDS`, the
tables' own share), beats the as-written fit's. The marginal likelihood averages the evidence
over the scale grid: the first version took each fit's best point of the grid, which flatters
a design that fits a few samples by chance, and needed odds of e^-3 to stop reading charging
devices per network. Chosen on the LODO subset (NB201; FBNet's keys hold no dead code) and on
`benchmarks/unlike_references.py` (its defaults: every 3rd target, 2 seeds), mean rho at
k = 5 / 10 / 20 / 50:

| the test | LODO subset NB201 | no-dead-code | dead-code |
|---|---|---|---|
| best point, odds e^-3 (before) | .942/.958/.967/.970 | .759/.843/.914/.935 | .783/.875/.905/.925 |
| marginal, even odds | .922/.933/.962/.969 | .861/.913/.952/– | .782/.870/.900/– |
| marginal, e^-1.5 | | .763/.849/.929/– | .783/.875/.900/– |
| **marginal, 13/27 (e^-0.73)** | .943/.957/.965/.969 | .801/.849/.950/.944 | .783/.875/.900/.925 |

Random references went from .902/.915/.940/.948 to .902/.915/.940/.954, GPUs from
.894/.937/.943/.959 to .910/.937/.940/.965.

With every device in turn (`latfarm bench predictor --lodo`) NB201 went from
.944/.956/.965/.973 to .945/.955/.962/.971 (seed spread .005-.015). Even odds cost the LODO
subset .020 at k=5: 1080ti_1 fell from .983 to .904 and titanx_1 from .976 to .887, devices that
charge read per network. Which reading was taken, every 2nd NB201 device (LODO, design samples,
2 seeds): of 26 runs per k on devices that charge, 1, 1, 0 and 0 were read per network at
k = 5 / 10 / 20 / 50 (0 at the best point and e^-3); of 14 on devices that do not, 2, 2, 5 and 7
(0, 1, 4 and 5 before). Forcing the per-network reading on the no-dead-code split (what a
perfect test would do) gives .909/.946/.952/.954: the room left at k = 5 and 10. Rejected on
the same benches:
- the two readings averaged by their posterior probability instead of keeping the likelier:
  no-dead-code .866/.915/.948/.943 and dead-code .779/.869/.898/.923, but the LODO subset
  .935/.948/.963/.970 (Spearman(std, |error|) rose to .255 at k=20, from .205);
- log MACs counting the dead convolutions too, as one more descriptor: no-dead-code
  .834/.895/.928/.944, dead-code .801/.891/.924/.937, random references .888/.924/.947/.946,
  but LODO NB201 with every device .944/.952/.957/.975 and the 90 % coverage at k=20 .907.

Shaping the uncertainty further was tried on the full LODO bench and rejected: Spearman of the
std against |error| at k = 5/10/20/50 was .266/.255/.205/.189 on NB201 and .109/.116/.103/.063 on
FBNet (before the Occam factor below), and no signal added more than .03 at k=20:
- the noise growing as the predicted latency falls (times exp(-z/4), z the prediction
  standardised over the space): .222 and .106 at k=20; the disagreement to the power 1: .209
  and .109;
- the samples' leave-one-out residuals, kernel-smoothed over the reference block (LODO subset,
  9 NB201 and 8 FBNet targets): .186 against .169 and .119 against .092 at k=20;
- where the dead-code reading is tested, the other reading's spread weighted by its probability:
  NB201 .292/.278/.227/.203, coverage at k=20 .933; a farm device has no such reading, so it
  would move the bench alone.
`benchmarks/calibration_ceiling.py` says why: each architecture's error on the other held-out
devices ranks a device's errors no better than this std does (NB201 .213, FBNet .072 at k=20),
while the device's own errors under other samples do (.522 and .590): what is left is the
device's, not the architectures'.

Richer descriptor blocks, tried on the FBNet GPUs split of `benchmarks/unlike_references.py`
(.662/.763/.877/.906 at k = 5/10/20/50 with the summary descriptors) and rejected: the pre-trained
trunk's hidden features, their top 16 principal components over the table's keys (networks
trained with the full configuration), .475/.672/.744/.886, or the top 4, .548/.708/.862/.884;
the space's standardised one-hot op encoding in the same block, .443/.499/.586/.632.

A sample the device mis-measured weighs as much as any other. One sample of k scaled by 1.5 / 2 /
0.5 (every 4th device of the LODO bench, 3 seeds) moves FBNet's mean rho at k=20 from .972 to
.939 / .875 / .866 and at k=10 from .970 to .757 / .696 / .636 (NB201 k=20: .956 to .946 / .932 /
.913): FBNet's latencies span little, so one bad sample bends the fit, below one proxy device's
(k=20 .956 clean, .958 / .958 / .932; k=10 .947, .911 / .900 / .816) and, at k=10, the table
ridge's (.942, .850 / .800 / .791). Setting aside the samples
whose leave-one-out residual makes them likelier outliers than not (prior 1 in 20, outliers
spread with a log-latency variance of 1; only from 10 samples up: at k=5 it flagged good samples,
NB201 .931 to .906) recovered most of it (FBNet k=20 .943 / .919 / .915, k=10 .839 / .902 / .920)
at no cost on clean samples there, but on `benchmarks/unlike_references.py`, where the model is
further from every device, it set good samples aside: FBNet GPUs at k=10 .763 to .706, NB201
dead-code targets .875 to .852. Rejected. The agent keeps out measurements whose runs drift or
scatter (`agent.quality`); a slowdown steady over a whole measurement passes both checks, and
only the device's canary (every 50 jobs by default) can catch one that lasts. So onboarding
measures a suspect sample twice more and keeps the median (`LatencyPredictor.suspect_samples`,
`server.services.onboarding`): a true surprise costs two runs, never accuracy. The residual
there is against the fit to the other samples with its scales chosen again; with the fit's own
scales, a sample twice as slow widened the noise it was judged by and hid.

"like" takes its direction from the very samples it is scored on, so its evidence at the best
point of the grid was that of a direction known beforehand. It now pays for the pick
(`_direction_log_factor`): the mean, over the reference devices, of each one's evidence as the
direction alone, against the best one's; about -log(n_ref) when one device alone looks like the
target, nothing when every device does. Measured before and after (k = 5 / 10 / 20 / 50):
- unlike references (`benchmarks/unlike_references.py`, its defaults), NB201 dead-code targets
  .783/.875/.900/.925 to .802/.884/.902/.925, no-dead-code .801/.849/.950/.944 to
  .816/.853/.951/.944, GPUs and the reverse .910/.937/.940/.965 to .909/.935/.940/.965, random
  .902/.915/.940/.954 to .906/.917/.940/.954; FBNet GPUs .662/.763/.877/.906 to
  .663/.765/.877/.906, random .831/.854/.899/.911 to .839/.858/.900/.913;
- the cross-space bench (`latfarm bench cross-space`), FBNet's space unseen .584/.807/.866/.871
  to .603/.855/.865/.873, with the device also unseen .686/.812/.862/.871 to .767/.836/.861/.873;
  NB201's space unseen .787/.812/.801/.810 to .787/.813/.802/.810 (above the FLOPs ridge at k=20
  on 28 of 40 devices, from 26);
- the test of tests/predictor/test_adaptation.py with 40 reference devices of noise and 5
  samples, 0.946 to 0.991;
- the cost, where references are many and alike: LODO with every device NB201
  .945/.955/.962/.971 to .938/.955/.962/.971 (MAPE at k=5 8.7 % to 9.7 %), FBNet
  .935/.941/.945/.952 to .938/.942/.946/.952; a synthetic device that follows one of 40
  references, 5 samples: 0.879 to 0.812.
Rejected on the same benches: the factor in the marginal likelihood too (the dead-code test's):
LODO NB201 .939/.949/.964/.971, no-dead-code targets .796/.853/.951/.936; weighing the
hypotheses by their evidence averaged over the grid instead of its best point (no factor):
FBNet's space unseen .570/.797/.865/.871.

NB201's descriptors were its features' whole summary tail (op shares as written, live op shares,
whether the cell is connected) and the two costs: twelve columns, near-copies of one another, under
one isotropic prior. On the dead-code split of `benchmarks/unlike_references.py` a ridge on the
four free op shares alone, fitted to the same samples, beat the whole adaptation at k >= 10
(.806/.930/.941/.954 against .802/.884/.902/.925): a device that charges for dead code runs the ops
as written, which the references there cannot show, and the prior spread over the copies let the
live shares and the costs take the weight. The descriptors are now the op shares of the key as
read and the costs (`SearchSpace.summary_dim`): per network those are the built network's ops
(the live shares repeated them), as written the ops a charging device runs. The descriptors-only
hypothesis on its own, same samples, k = 5 / 10 / 20, by descriptor set:

| descriptors | dead-code targets | no-dead-code targets |
|---|---|---|
| all twelve (before) | .836/.900/.917 | .843/.921/.950 |
| op shares as written | .856/.928/.941 | .806/.919/.946 |
| op shares as written and live | .823/.916/.927 | .809/.920/.945 |
| live op shares and costs | .808/.846/.856 | .830/.905/.944 |
| **op shares as written and costs** | .877/.913/.925 | .874/.925/.950 |
| all twelve, whitened over the table | .679/.859/.880 | .732/.893/.949 |

The whole adaptation, before and after, k = 5 / 10 / 20 / 50: unlike references, dead-code
targets .802/.884/.902/.925 to .853/.890/.926/.932, no-dead-code .816/.853/.951/.944 to
.776/.905/.926/.944, GPUs and the reverse .909/.935/.940/.965 to .924/.937/.955/.967, random
.906/.917/.940/.954 to .909/.929/.937/.958; LODO with every NB201 device .938/.955/.962/.971 to
.952/.963/.966/.974 (MAPE at k=5 9.7 % to 8.9 %), the 90 % interval's coverage at k=20 .922 to
.932, Spearman(std, |error|) .282/.269/.212/.191 to .219/.226/.193/.165. Rejected on the same
benches: the twelve with the costs under a prior scale of their own (a second descriptor scale on
the grid): dead-code .788/.882/.903/.915, no-dead-code .770/.859/.947/.944, random
.893/.912/.936/.951; FBNet's descriptors without its op shares (the costs alone): GPUs
.605/.620/.665/.690 against .663/.765/.877/.906.

The costs followed: log MACs and parameters of the key as read (`SearchSpace.written_cost`), so
where keys are read as written the convolutions on dead edges count, as they do on a device that
charges for them (per network the key is the network's, and nothing changes). Same benches,
before and after: dead-code targets .853/.890/.926/.932 to .891/.914/.945/.947, GPUs and the
reverse .924/.937/.955/.967 to .923/.954/.964/.968, random .909/.929/.937/.958 to
.902/.941/.947/.965, no-dead-code .776/.905/.926/.944 to .718/.928/.940/.956 (with every one of
its 13 targets and 3 seeds, .833/.916 to .823/.907 at k = 5/10); LODO NB201 .952/.963/.966/.974
to .948/.963/.970/.974, coverage at k=20 .932 to .935, Spearman(std, |error|)
.219/.226/.193/.165 to .213/.211/.183/.166. Both steps together, with every target of the two
dead-code splits and 3 seeds: dead-code (27 targets) .819/.886/.922/.942 to .851/.932/.956/.958,
no-dead-code (13) .859/.924/.946/.948 to .823/.907/.929/.951: kept for the larger gain on the
larger class and on LODO. (Tried before the descriptors were pruned, as a
thirteenth descriptor beside the built network's MACs, it cost LODO: see the dead-code test above.)
"""

from __future__ import annotations

import itertools
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
    coef = sum(p * mean for p, (mean, _) in zip(probability, fits))
    # the mixture's covariance: each fit's own, plus the spread of the fits' means about `coef`
    cov = sum(p * (fit_cov + np.outer(mean - coef, mean - coef)) for p, (mean, fit_cov) in zip(probability, fits))
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
