"""Is a sample measured on a noisy host worth more than no sample?

Onboarding leaves out an architecture whose measurements the agent flagged each time (unstable
or drifting runs, measured three times in all): `server.services.adaptation`. The alternative
is to train on the median of those flagged measurements. This weighs the two on reference
devices, read per network as a farm device is: the leave-one-device-out protocol (`latfarm bench
predictor --lodo`; every `--every`-th device of a space is the target, the base is pre-trained on
the others, k samples come from the default sampler), and a `--share` of each sample set is
either dropped or kept with its latency times exp(N(0, sigma^2)), for each `--sigmas` value.

    python benchmarks/flagged_samples.py                  # NB201 and FBNet, every 4th device
    python benchmarks/flagged_samples.py --space fbnet --k 10 20 50

Prints one line per space and k, mean Spearman rho on the networks no sample measured (which
samples are flagged, and their errors, are seeded; with the errors on other samples FBNet's
sigma=0.2 column at k=10 ranged 0.80-0.91, its latencies spanning little):

    flagged nb201 k=10: exact 0.975 dropped 0.958 sigma=0.05 0.973 sigma=0.1 0.971 ...
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from predictor import get_sampler, metrics
from predictor.bench.lodo import SPACES, folds, held_out_keys, read_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=SPACES, nargs="+", default=list(SPACES))
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=4, help="every n-th device of the space is a target")
    parser.add_argument("--share", type=float, default=0.4, help="share of the samples that were flagged")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3],
                        help="log-latency standard deviations of a flagged sample's error")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for space_name in args.space:
        scores: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for fold in folds(space_name, args.every):
            space, base, device = fold.space, fold.base, fold.device
            _, truth = read_device("per_network", space, fold.table, device, base)
            for k in args.k:
                for seed in range(args.seeds):
                    picked = get_sampler("default").select(space, k, seed=seed, predictor=base,
                                                           candidates=list(truth))
                    held_out = held_out_keys(list(truth), picked, base.network_key)
                    measured = np.asarray([truth[key] for key in held_out])
                    rng = np.random.default_rng(seed)
                    flagged = rng.choice(picked, size=round(args.share * k), replace=False).tolist()
                    sample_sets = {"exact": {key: truth[key] for key in picked},
                                   "dropped": {key: truth[key] for key in picked if key not in flagged}}
                    for sigma in args.sigmas:
                        error = {key: float(np.exp(rng.normal(0.0, sigma))) for key in flagged}
                        sample_sets[f"sigma={sigma:g}"] = {key: truth[key] * error.get(key, 1.0) for key in picked}
                    for name, samples in sample_sets.items():
                        predicted = base.adapt(samples, name=device).predict(held_out)[0]
                        scores[k][name].append(metrics.spearman(predicted, measured))
            print(f"  {space_name}: {device}", flush=True)
        for k in args.k:
            print(f"flagged {space_name} k={k}: "
                  + " ".join(f"{name} {np.mean(values):.3f}" for name, values in scores[k].items()), flush=True)


if __name__ == "__main__":
    main()
