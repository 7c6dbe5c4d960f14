"""Does onboarding's check find a mis-measured sample, and how often does it suspect a good one?

The leave-one-device-out protocol (`latfarm bench predictor --lodo`): every `--every`-th
reference device of a space is the target, the base is pre-trained on the others, k samples
come from the default sampler. Per (device, seed), one sample picked at random is scaled by each
`--factors` value and `LatencyPredictor.suspect_samples` is asked whether it is suspect; the
clean samples are checked too (a suspect there costs two more runs in onboarding, no accuracy).
The device is read per network, as a farm device is; the tables' devices that charge for dead
code were not, so on NB201 some suspects among clean samples are that, not noise.

    python benchmarks/suspect_samples.py                  # NB201 and FBNet, every 4th device
    python benchmarks/suspect_samples.py --space fbnet --k 10

Prints one line per space:

    suspects nb201 k=20: caught C/N mis-measured; clean: S suspects per onboarding, A of B with any
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from predictor import get_sampler
from predictor.bench.lodo import SPACES, folds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=SPACES, nargs="+", default=list(SPACES))
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=4, help="every n-th device of the space is a target")
    parser.add_argument("--factors", type=float, nargs="+", default=[1.5, 2.0, 0.5],
                        help="how far off the mis-measured sample is")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for space_name in args.space:
        caught, tried, clean = 0, 0, []
        for fold in folds(space_name, args.every):
            space, base, device = fold.space, fold.base, fold.device
            truth = fold.table.device_truth(device)
            for seed in range(args.seeds):
                picked = get_sampler("default").select(space, args.k, seed=seed, predictor=base,
                                                       candidates=list(truth))
                samples = {key: truth[key] for key in picked}
                victim = picked[np.random.default_rng(seed).integers(len(picked))]
                for factor in args.factors:
                    off = {**samples, victim: factor * samples[victim]}
                    caught += base.network_key(victim) in base.adapt(off, name=device).suspect_samples()
                    tried += 1
                clean.append(len(base.adapt(samples, name=device).suspect_samples()))
            print(f"  {space_name}: {device}", flush=True)
        print(f"suspects {space_name} k={args.k}: caught {caught}/{tried} mis-measured; clean: "
              f"{np.mean(clean):.2f} suspects per onboarding, {np.count_nonzero(clean)} of {len(clean)} with any",
              flush=True)


if __name__ == "__main__":
    main()
