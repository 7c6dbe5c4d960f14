"""How well can any uncertainty rank the adaptation's errors? The leave-one-device-out protocol
(`latfarm bench predictor --lodo`: each reference device in turn the target, the base pre-trained
on the others, k samples from the default sampler), scored three ways per (device, k, seed):

- `ours`: Spearman of the predicted relative std against |log error| (the LODO bench's
  `calibration_rho`);
- `other devices`: the same, with the other targets' own |log error| on each architecture (same
  k and seed) in place of our std: what an uncertainty that an architecture carries on every
  device could reach at best, an oracle no method has;
- `other seeds`: with the same device's |log error| under its other seeds' samples: how much of
  the error belongs to the device rather than to the draw;
- `pooled`: our std against |log error| over every (device, architecture) of a seed at once, the
  mean over seeds: does the uncertainty tell the devices it predicts well from the others?
- `across devices`: per device, the mean relative std (what an onboarding's `target_uncertainty` is
  compared with) against the mean |log error|, Spearman over the devices of a seed; and `std/error`,
  the ratio of the two means with the std turned into the mean |error| it implies (x sqrt(2/pi)),
  above 1 where the std overstates the typical error.

    python benchmarks/calibration_ceiling.py                  # NB201 and FBNet, every device
    python benchmarks/calibration_ceiling.py --space fbnet --every 3

Prints one line per space and k:

    calibration nb201 k=20: ours=X other-devices=Y other-seeds=Z pooled=P across-devices=D
        std/error=R (devices=N, seeds=S)
"""

from __future__ import annotations

import argparse
import warnings
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch

from predictor import get_sampler, metrics
from predictor.bench.lodo import KS, SPACES, folds


def log_errors(space_name: str, every: int, ks: list[int], seeds: int) -> dict[tuple[str, int, int], np.ndarray]:
    """Per (device, k, seed): |log error| over the space's keys (NaN where sampled) and, after it,
    the predicted relative std (same layout), stacked as rows 0 and 1."""
    out = {}
    for fold in folds(space_name, every):
        space, table, base, device = fold.space, fold.table, fold.base, fold.device
        truth = table.device_truth(device)
        keys = list(truth)
        position = {key: i for i, key in enumerate(table.keys)}
        for k in ks:
            for seed in range(seeds):
                picked = set(get_sampler("default").select(space, k, seed=seed, predictor=base, candidates=keys))
                held_out = [key for key in keys if key not in picked]
                samples = {key: truth[key] for key in picked}
                ms, std = base.adapt(samples, name=device, per_network=None).predict(held_out)
                rows = np.full((2, len(table.keys)), np.nan)
                columns = [position[key] for key in held_out]
                rows[0, columns] = np.abs(np.log([truth[key] for key in held_out]) - np.log(ms))
                rows[1, columns] = std / ms
                out[(device, k, seed)] = rows
        print(f"  {space_name}: {device}", flush=True)
    return out


class Ceiling(NamedTuple):
    """The three scores at one k, means over (device, seed) cells, and how many of each."""

    ours: float
    other_devices: float
    other_seeds: float
    pooled: float
    across_devices: float
    std_over_error: float
    devices: int
    seeds: int


def ceiling(cells: dict[tuple[str, int, int], np.ndarray], k: int) -> Ceiling:
    """The three scores at `k`: for each (device, seed) cell, then their mean."""
    at_k = {(device, seed): rows for (device, cell_k, seed), rows in cells.items() if cell_k == k}
    scores: dict[str, list[float]] = defaultdict(list)
    for (device, seed), rows in at_k.items():
        held = np.isfinite(rows[0])
        error = rows[0, held]
        on_other_devices = [r[0, held] for (d, s), r in at_k.items() if s == seed and d != device]
        on_other_seeds = [r[0, held] for (d, s), r in at_k.items() if d == device and s != seed]
        scores["ours"].append(metrics.spearman(rows[1, held], error))
        for name, others in (("devices", on_other_devices), ("seeds", on_other_seeds)):
            if others:
                with warnings.catch_warnings():  # an architecture every other cell sampled: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    oracle = np.nanmean(others, axis=0)
                usable = np.isfinite(oracle)
                scores[name].append(metrics.spearman(oracle[usable], error[usable]))
    ours, other_devices, other_seeds = (float(np.nanmean(scores[name])) if scores[name] else float("nan")
                                        for name in ("ours", "devices", "seeds"))
    seeds = sorted({seed for _, seed in at_k})
    pooled, across_devices, std_over_error = [], [], []
    for seed in seeds:
        held = [rows[:, np.isfinite(rows[0])] for (_, s), rows in at_k.items() if s == seed]
        error, std = np.hstack(held)
        pooled.append(metrics.spearman(std, error))
        device_error, device_std = np.asarray([cell.mean(axis=1) for cell in held]).T
        across_devices.append(metrics.spearman(device_std, device_error))
        std_over_error.append(float(np.mean(device_std * np.sqrt(2 / np.pi) / device_error)))
    return Ceiling(ours, other_devices, other_seeds, float(np.mean(pooled)), float(np.mean(across_devices)),
                   float(np.mean(std_over_error)), len({device for device, _ in at_k}), len(seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=SPACES, nargs="+", default=list(SPACES))
    parser.add_argument("--k", type=int, nargs="+", default=list(KS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--every", type=int, default=1, help="every n-th device of the space is a target")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for space_name in args.space:
        cells = log_errors(space_name, args.every, args.k, args.seeds)
        for k in args.k:
            score = ceiling(cells, k)
            print(f"calibration {space_name} k={k}: ours={score.ours:.3f} other-devices={score.other_devices:.3f} "
                  f"other-seeds={score.other_seeds:.3f} pooled={score.pooled:.3f} "
                  f"across-devices={score.across_devices:.3f} std/error={score.std_over_error:.2f} "
                  f"(devices={score.devices}, seeds={score.seeds})", flush=True)


if __name__ == "__main__":
    main()
