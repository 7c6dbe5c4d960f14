"""The bench harness: the MLSys 2024 few-shot latency tasks, every method, resumable.

Per task: pre-train one base predictor on the task's train devices only (which also chooses its
default sampler, by leave-one-train-device-out validation; see `predictor.validation`); then for each test
device, k and seed, let each method's sampler pick k of the device's keys (it sees keys, never
latencies), "measure" them by reading the table, let the method predict every other key of the
device, and score Spearman's rho against the table. Raw rows go to `predictor.csv`, one per
(task, device, method, k, seed); rows already there are not recomputed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from predictor.datasets import find_datasets
from predictor.model import LatencyPredictor, TrainConfig
from predictor.samplers import Sampler, get_sampler
from predictor.spaces import get_space

from .data import Split, Task, load_space_table, load_tasks, memoised_space, split
from .methods import Method, TaskContext, get_methods

RAW_FILE = "predictor.csv"
RAW_COLUMNS = ("task", "device", "method", "k", "seed", "spearman")
DIAGNOSTICS_FILE = "diagnostics.csv"
DIAGNOSTICS_COLUMNS = ("task", "device", "method", "k", "seed", "metric", "value")
RUN_FILE = "run.json"

DEFAULT_KS = (5, 10, 20)
DEFAULT_SEEDS = 3
QUICK_TASKS = ("N0",)
QUICK_KS = (5, 20)
QUICK_SEEDS = 1
QUICK_CONFIG = TrainConfig(members=1, epochs=6)

#: progress(done, total, description), counted in raw rows
Progress = Callable[[int, int, str], None]
RowKey = tuple[str, str, str, int, int]

#: files whose edits change the numbers; a resumed run refuses rows from other versions of them
_SOURCES = ("model.py", "network.py", "pretraining.py", "adaptation.py", "checkpoint.py", "metrics.py",
            "samplers.py", "validation.py", "reference.py", "spaces/*.py", "bench/data.py", "cost.py", "datasets.py",
            "bench/methods.py", "bench/run.py")


class BenchMismatch(RuntimeError):
    """The output folder holds rows of a different configuration or predictor version."""


@dataclass
class BenchResult:
    out_dir: Path
    rows_written: int
    rows_skipped: int
    tasks_pretrained: list[str]


def run_bench(
    tasks: Sequence[str] | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    methods: Sequence[str | Method] | None = None,
    out_dir: str | Path = "docs/bench",
    quick: bool = False,
    progress: Progress | None = None,
    *,
    datasets: Path | None = None,
    config: TrainConfig | None = None,
    fresh: bool = False,
    pretrain_seed: int = 0,
    sampler_lookup: Callable[[str], Sampler] = get_sampler,
    report: bool = True,
) -> BenchResult:
    """Run (or resume) the bench and write its raw rows, then the summary table and plot.

    `quick`: task N0, k in (5, 20), one seed and a cheaper pre-training, for a smoke run.
    `fresh`: discard the rows already in `out_dir` instead of resuming from them.
    """
    root = Path(datasets) if datasets is not None else find_datasets()
    all_tasks = load_tasks(root)
    if quick:
        tasks, ks, seeds = QUICK_TASKS, QUICK_KS, QUICK_SEEDS
        config = config or QUICK_CONFIG
    config = config or TrainConfig()
    names = list(all_tasks) if not tasks else list(tasks)
    unknown = [name for name in names if name not in all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(all_tasks)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 2 or not seed_list:
        raise ValueError("need at least one k (each at least 2) and at least one seed")
    method_list = [m if isinstance(m, Method) else get_methods([m])[0] for m in methods] if methods else get_methods()
    repeated = sorted({m.name for m in method_list if [n.name for n in method_list].count(m.name) > 1})
    if repeated:
        raise ValueError(f"method(s) named more than once: {', '.join(repeated)}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_run(out, config, pretrain_seed, fresh)
    done = set(_read_raw_keys(out / RAW_FILE))

    plan = {name: _missing(all_tasks[name], method_list, ks, seed_list, done) for name in names}
    total = sum(len(cells) for per_method in plan.values() for cells in per_method.values())
    skipped = sum(len(all_tasks[n].test) * len(ks) * len(seed_list) *
                  sum(m.supports(all_tasks[n].space) for m in method_list) for n in names) - total
    counter = _Counter(total, progress)
    pretrained = []
    for name in names:
        if not plan[name]:
            continue
        task = all_tasks[name]
        table = load_space_table(root, task.space)
        task_split = split(task, table)
        space = memoised_space(table.space, table.keys)
        needs_base = any(m.needs_base or m.sampler != "random" for m in method_list if (m.name in plan[name]))
        base = None
        if needs_base:
            counter.describe(f"{name}: pre-training on {len(task.train)} devices")
            start = time.perf_counter()
            base = LatencyPredictor.pretrain(space, task_split.train_rows, seed=pretrain_seed, config=config)
            validation = [(name, "", "", k, "", f"validation_rho_{sampler}", f"{rho:.6f}")
                          for sampler, per_k in base.sampler_scores.items() for k, rho in per_k.items()]
            append_rows(out / DIAGNOSTICS_FILE, DIAGNOSTICS_COLUMNS,
                    [(name, "", "", "", "", "pretrain_s", f"{time.perf_counter() - start:.3f}"),
                     (name, "", "", "", "", "torch_threads", str(torch.get_num_threads())), *validation])
            pretrained.append(name)
        context = TaskContext(space, task.train, base, {key: i for i, key in enumerate(table.keys)},
                              table.matrix(task.train))
        _run_task(task, task_split, context, [m for m in method_list if m.name in plan[name]], ks, seed_list,
                  plan[name], sampler_lookup, out, counter)
    if report:
        from .report import write_report

        write_report(out, all_tasks)
    return BenchResult(out, counter.done, skipped, pretrained)


def _run_task(task: Task, task_split: Split, context: TaskContext, methods: list[Method], ks: list[int],
              seeds: list[int], missing: dict[str, set[tuple[str, int, int]]],
              sampler_lookup: Callable[[str], Sampler], out: Path, counter: _Counter) -> None:
    timed_space = task.space != "nb201"  # whole-space prediction is timed once, on NB201
    for device in task_split.test_devices:
        counter.describe(f"{task.name}: {device.name}")
        for k in ks:
            for seed in seeds:
                todo = [m for m in methods if (device.name, k, seed) in missing[m.name]]
                if not todo:
                    continue
                rows, diagnostics = [], []
                picks: dict[str, tuple[dict[str, float], list[str], np.ndarray]] = {}
                for method in todo:
                    if method.sampler not in picks:
                        selected = _select(sampler_lookup(method.sampler), context, list(device.keys), k, seed)
                        chosen = set(selected)
                        held_out = [key for key in device.keys if key not in chosen]
                        picks[method.sampler] = ({key: device.truth[key] for key in selected}, held_out,
                                                 np.asarray([device.truth[key] for key in held_out]))
                    samples, held_out, truth = picks[method.sampler]
                    prediction = method.predict(context, device.name, samples, held_out, seed)
                    rho = _spearman(prediction.ms, truth)
                    rows.append((task.name, device.name, method.name, k, seed, f"{rho:.6f}"))
                    cell = (task.name, device.name, method.name, k, seed)
                    for metric, value in prediction.extras.items():
                        diagnostics.append((*cell, metric, f"{value:.6f}"))
                    if prediction.std is not None:
                        error = np.abs(prediction.ms - truth)
                        diagnostics.append((*cell, "calibration_rho", f"{_spearman(prediction.std, error):.6f}"))
                        diagnostics.append((*cell, "calibration_rel_rho",
                                            f"{_spearman(prediction.std / prediction.ms, error / truth):.6f}"))
                    if not timed_space and prediction.model is not None and k == ks[-1]:
                        seconds, nonfinite = _time_space_prediction(prediction.model)
                        diagnostics.append((*cell, "predict_space_s", f"{seconds:.6f}"))
                        diagnostics.append((*cell, "predict_space_nonfinite", str(nonfinite)))
                        timed_space = True
                append_rows(out / DIAGNOSTICS_FILE, DIAGNOSTICS_COLUMNS, diagnostics)
                append_rows(out / RAW_FILE, RAW_COLUMNS, rows)
                counter.advance(len(rows))


def _select(sampler: Sampler, context: TaskContext, candidates: list[str], k: int, seed: int) -> list[str]:
    """The sampler's picks; it is handed the base predictor and the device's keys, nothing else."""
    keys = sampler.select(context.space, k, seed=seed, predictor=context.base, candidates=candidates)
    if len(set(keys)) != k or not set(keys) <= set(candidates):
        raise ValueError(f"sampler {sampler.name!r} returned {len(set(keys))} distinct keys, not {k} of the candidates")
    return list(keys)


def _time_space_prediction(model: LatencyPredictor) -> tuple[float, int]:
    """Seconds to predict the whole NB201 space (15,625 keys, the 341 cells without an
    input-output path included) with a reloaded, uncached predictor; and how many of those
    predictions (ms or std) were not finite numbers."""
    fresh = LatencyPredictor.load(model.to_bytes())
    keys = list(get_space("nb201").enumerate())
    start = time.perf_counter()
    with np.errstate(over="ignore", invalid="ignore"):  # counted below instead
        ms, std = fresh.predict(keys)
    seconds = time.perf_counter() - start
    return seconds, int((~(np.isfinite(ms) & np.isfinite(std))).sum())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _missing(task: Task, methods: list[Method], ks: list[int], seeds: list[int],
             done: set[RowKey]) -> dict[str, set[tuple[str, int, int]]]:
    """Per method: the (device, k, seed) cells of this task without a row yet."""
    plan = {}
    for method in methods:
        if not method.supports(task.space):
            continue
        cells = {(d, k, s) for d in task.test for k in ks for s in seeds
                 if (task.name, d, method.name, k, s) not in done}
        if cells:
            plan[method.name] = cells
    return plan


# ---- files ----------------------------------------------------------------------------------------


def _read_raw_keys(path: Path) -> Iterable[RowKey]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != RAW_COLUMNS:
            raise BenchMismatch(f"{path} does not have the columns {','.join(RAW_COLUMNS)}")
        return [(r["task"], r["device"], r["method"], int(r["k"]), int(r["seed"])) for r in reader]


def append_rows(path: Path, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    if not rows:
        return
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(columns)
        writer.writerows(rows)


def _fingerprint(config: TrainConfig, pretrain_seed: int) -> dict[str, object]:
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for pattern in _SOURCES:
        for path in sorted(package.glob(pattern)):
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return {"train_config": asdict(config), "pretrain_seed": pretrain_seed, "predictor_sources": digest.hexdigest()}


def _check_run(out: Path, config: TrainConfig, pretrain_seed: int, fresh: bool) -> None:
    """Resume only rows made by the same configuration and predictor code; `fresh` clears them."""
    current = _fingerprint(config, pretrain_seed)
    run_file = out / RUN_FILE
    if fresh:
        for name in (RAW_FILE, DIAGNOSTICS_FILE):
            (out / name).unlink(missing_ok=True)
    elif (out / RAW_FILE).is_file() and run_file.is_file():
        previous = json.loads(run_file.read_text())
        changed = [key for key in current if previous.get(key) != current[key]]
        if changed:
            raise BenchMismatch(
                f"{out} holds rows made with a different {' and '.join(changed).replace('_', ' ')}; "
                "rerun with --fresh (or another --out) rather than mix them"
            )
    run_file.write_text(json.dumps(current, indent=2) + "\n")


class _Counter:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress, self.description = total, 0, progress, ""

    def describe(self, description: str) -> None:
        self.description = description
        self._report()

    def advance(self, n: int) -> None:
        self.done += n
        self._report()

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.done, self.total, self.description)
