"""Few references, none like the target or drawn at random: the validation that shows where the
adaptation falls short, on reference devices only (no 12-task test device takes part).

    python benchmarks/unlike_references.py                       # every split, NB201
    python benchmarks/unlike_references.py --split dead-code --seeds 3
    python benchmarks/unlike_references.py --space fbnet           # gpu and random (FBNet)

Each target device (every `--every`-th of those the split allows) gets a base predictor
pre-trained on `--references` devices drawn at random from those the split allows, then k
samples drawn by the base's default sampler; our adaptation and `scratch` (a ridge on the space's features
fitted to the same samples alone, the 12-task bench's baseline) predict the rest. Splits:

- `dead-code` (NB201 only: FBNet's keys hold no dead code): targets are the NB201 devices whose tables
  charge for dead code, references the ones that do not (`MeasuredReference.charges`, as in
  docs/bench/lodo.md: the 13 LatBench devices);
- `no-dead-code` (NB201 only): the reverse, the devices that do not charge adapted from ones
  that do;
- `gpu`: desktop GPUs are adapted from references that are not GPUs, and the others from GPUs;
- `random`: references drawn from every other device, like or unlike (the 12-task bench's
  regime of a few mixed training devices, on reference devices only).

Prints one line per k:

    unlike-references nb201 dead-code k=20: n=N ours rho=X scratch rho=Y

`--hypotheses` also adapts each run under each of the adaptation's hypotheses alone
(`predictor.adaptation.HYPOTHESES`) and adds their mean rho and the per-run best of them
("oracle"): how much the evidence's weighing of the hypotheses leaves on the table.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch

from predictor import LatencyPredictor, adaptation, get_sampler, metrics
from predictor.bench.data import load_space_table, memoised_space
from predictor.bench.lodo import CONFIG, SPACES
from predictor.bench.methods import Scratch, TaskContext
from predictor.datasets import find_datasets
from predictor.reference import LatencyTable, MeasuredReference

#: the desktop GPUs of the tables, by name (HELP's and LatBench's)
GPU = ("1080ti", "2080ti", "titan", "desktop_gpu")
SPLITS = ("dead-code", "no-dead-code", "gpu", "random")
#: the splits only NB201 has (no other space's keys hold dead code)
DEAD_CODE_SPLITS = ("dead-code", "no-dead-code")


def split_rules(split: str, charges: dict[str, bool]) -> tuple[Callable[[str], bool], Callable[[str, str], bool]]:
    """(which devices are targets, whether a device may be a reference of a target)."""
    if split == "dead-code":
        return (lambda d: charges[d]), (lambda d, _target: not charges[d])
    if split == "no-dead-code":
        return (lambda d: not charges[d]), (lambda d, _target: charges[d])
    if split == "gpu":
        return (lambda _d: True), (lambda d, target: d.startswith(GPU) != target.startswith(GPU))
    return (lambda _d: True), (lambda _d, _target: True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", choices=SPACES, default="nb201")
    parser.add_argument("--split", choices=SPLITS, nargs="+",
                        help="default: every split the space has")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--references", type=int, default=5)
    parser.add_argument("--every", type=int, default=3, help="every n-th target device of the split")
    parser.add_argument("--hypotheses", action="store_true",
                        help="also score each hypothesis of the adaptation alone, and the per-run best of them")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = args.split or [split for split in SPLITS if args.space == "nb201" or split not in DEAD_CODE_SPLITS]
    if args.space != "nb201" and set(splits) & set(DEAD_CODE_SPLITS):
        parser.error("the dead-code splits are NB201's: no other space's keys hold dead code")
    table = load_space_table(find_datasets(), args.space)
    space = memoised_space(table.space, table.keys)
    devices = sorted(table.latencies)
    with np.errstate(divide="ignore"):
        every_device = LatencyTable(table.keys, devices, np.log(table.matrix(devices)).astype(np.float32))
    charges = dict(zip(devices, MeasuredReference.of(space, every_device).charges.tolist()))
    scratch = Scratch()
    for split in splits:
        is_target, may_reference = split_rules(split, charges)
        rng = np.random.default_rng(0)
        scores: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for device in [d for d in devices if is_target(d)][::args.every]:
            pool = [d for d in devices if d != device and may_reference(d, device)]
            references = sorted(rng.choice(pool, size=min(args.references, len(pool)), replace=False).tolist())
            with np.errstate(divide="ignore"):
                reference_table = LatencyTable(table.keys, references,
                                               np.log(table.matrix(references)).astype(np.float32))
            base = LatencyPredictor.fit(space, reference_table, config=CONFIG)
            context = TaskContext(space, tuple(references), base)
            truth = table.device_truth(device)
            for k in args.k:
                for seed in range(args.seeds):
                    picked = get_sampler("default").select(space, k, seed=seed, predictor=base, candidates=list(truth))
                    samples = {key: truth[key] for key in picked}
                    held_out = [key for key in truth if key not in samples]
                    measured = np.asarray([truth[key] for key in held_out])
                    ours = base.adapt(samples, name=device, per_network=None).predict(held_out)[0]
                    baseline = scratch.predict(context, device, samples, held_out, seed).ms
                    scores[k]["ours"].append(metrics.spearman(ours, measured))
                    scores[k]["scratch"].append(metrics.spearman(baseline, measured))
                    if args.hypotheses:
                        alone = [_alone(base, hypothesis, samples, device, held_out, measured)
                                 for hypothesis in adaptation.HYPOTHESES]
                        for hypothesis, rho in zip(adaptation.HYPOTHESES, alone):
                            scores[k][hypothesis].append(rho)
                        scores[k]["oracle"].append(max(alone))
        for k in args.k:
            print(f"unlike-references {args.space} {split} k={k}: n={len(scores[k]['ours'])} "
                  + " ".join(f"{method} rho={np.mean(rhos):.3f}" for method, rhos in scores[k].items()),
                  flush=True)


def _alone(base: LatencyPredictor, hypothesis: str, samples: dict[str, float], device: str, held_out: list[str],
           measured: np.ndarray) -> float:
    """Held-out rho of the adaptation with `hypothesis` its only one."""
    with mock.patch.object(adaptation, "HYPOTHESES", (hypothesis,)):
        predicted = base.adapt(samples, name=device, per_network=None).predict(held_out)[0]
    return metrics.spearman(predicted, measured)


if __name__ == "__main__":
    main()
