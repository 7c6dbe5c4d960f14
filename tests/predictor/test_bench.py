"""The predictor bench: analytic FLOPs, the no-leak split, resume, and the CLI end to end.

Most tests run on a small synthetic datasets folder (the real tables' layout, a few hundred
architectures, made-up devices) so that they take seconds; one slow test runs `--quick` on the
real tables.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from predictor import LatencyPredictor, TrainConfig, get_sampler, get_space
from predictor.bench import RAW_COLUMNS, BenchMismatch, load_space_table, load_tasks, run_bench, split
from predictor.bench.methods import Method, OneProxy, Prediction, TaskContext, ridge_fit_predict
from predictor.cost import analytic_cost, hooked_cost
from predictor.datasets import find_datasets
from predictor.reference import LatencyTable, Row
from predictor.samplers import Embedding, Sampler
from predictor.spaces import SearchSpace
from predictor.spaces.fbnet import FBNetSpace
from predictor.spaces.nb201 import NB201Space
from server.cli.bench import bench_app

REAL_DATASETS = find_datasets()
TINY = TrainConfig(epochs=2, members=1, hidden=32)

TRAIN = ("ref_a", "ref_b", "ref_c")
TEST = ("target_x", "target_y")


# ---- FLOPs --------------------------------------------------------------------------------------

NB201_EXTRA = [
    "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # no path: nothing but the fixed layers
    "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # a dead conv edge is not built
    "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
]
FBNET_EXTRA = ["|".join(["skip"] * 22), "|".join(["k5_e6"] * 22), "|".join(["k3_e1_g2", "k5_e1_g2"] * 11)]


@pytest.mark.parametrize("space_name, extra", [("nb201", NB201_EXTRA), ("fbnet", FBNET_EXTRA)])
def test_analytic_flops_and_params_match_hook_counts(space_name: str, extra: list[str]) -> None:
    space = get_space(space_name)
    keys = space.sample(4, seed=7) + extra
    macs, params = analytic_cost(space, keys)
    for key, m, p in zip(keys, macs, params):
        assert (int(m), int(p)) == hooked_cost(space, key), key


# ---- a synthetic datasets folder --------------------------------------------------------------


def _write_space(root: Path, space_name: str, keys: list[str], rng: np.random.Generator,
                 unconnected: Sequence[str] = ()) -> None:
    space = get_space(space_name)
    assert isinstance(space, NB201Space | FBNetSpace)  # the spaces keyed by op vectors
    with open(root / f"{space_name}_archs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        if space_name == "nb201":
            writer.writerow(["nb201_idx", "arch_str", "op_vec", "connected"])
            for i, key in enumerate([*keys, *unconnected]):
                writer.writerow([i, key, "".join(map(str, space.op_vec(key))), str(i < len(keys))])
        else:
            writer.writerow(["fbnet_idx", "op_vec", "ops"])
            for i, key in enumerate(keys):
                writer.writerow([i, "".join(map(str, space.op_vec(key))), key])
    macs = analytic_cost(space, keys)[0] / 1e6
    ops = np.asarray([space.op_vec(key) for key in keys])
    with gzip.open(root / f"{space_name}_latency.csv.gz", "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arch_idx", "device", "latency_ms"])
        for device in (*TRAIN, *TEST):
            op_cost = rng.uniform(0, 0.3, ops.max() + 1)  # each device has its own per-op quirks
            ms = (0.5 + macs ** rng.uniform(0.6, 1.0) * rng.uniform(0.01, 0.05) + op_cost[ops].sum(axis=1))
            ms *= np.exp(rng.normal(0, 0.02, len(keys)))
            for i, value in enumerate(ms):
                writer.writerow([i, device, f"{value:.4f}"])
            if space_name == "nb201":  # unconnected cells have rows too, and are dropped
                for i in range(len(keys), len(keys) + len(unconnected)):
                    writer.writerow([i, device, "1.0"])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    nb201 = get_space("nb201")
    connected = [key for key in nb201.sample(400, seed=1) if nb201.is_connected(key)][:300]
    _write_space(root, "nb201", connected, rng, unconnected=[NB201_EXTRA[0]])
    _write_space(root, "fbnet", get_space("fbnet").sample(300, seed=2), rng)
    published = {"k": 20, "nasflat": 0.9, "help_k10": 0.8, "multipredict": 0.85}
    spec = {"tasks": {
        "nb201": {"N0": {"train": list(TRAIN), "test": list(TEST), "published": {**published, "nasflat_k5": 0.5}}},
        "fbnet": {"F0": {"train": list(TRAIN), "test": list(TEST), "published": published}},
    }}
    (root / "tasks.json").write_text(json.dumps(spec))
    return root


def _raw_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictor.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ---- no leak ---------------------------------------------------------------------------------------


def test_split_gives_pretraining_only_train_device_rows(datasets: Path) -> None:
    for task in load_tasks(datasets).values():
        table = load_space_table(datasets, task.space)
        parts = split(task, table)
        assert {device for _, device, _ in parts.train_rows} == set(task.train)
        assert [d.name for d in parts.test_devices] == list(task.test)
        assert len(table.keys) == 300  # the unconnected NB201 cell is dropped


def test_real_tasks_split_without_overlap() -> None:
    tasks = load_tasks(REAL_DATASETS)
    assert len(tasks) == 12
    for task in tasks.values():
        assert not set(task.train) & set(task.test)
        assert task.published["nasflat"] > 0


class _Spy(Method):
    """Records what a method is handed; predicts noise."""

    name = "spy"
    sampler = "random"

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, float], list[str]]] = []

    def predict(self, context: TaskContext, device: str, samples: Mapping[str, float],
                keys: Sequence[str], seed: int) -> Prediction:
        self.calls.append((dict(samples), list(keys)))
        return Prediction(np.random.default_rng(seed).random(len(keys)))


def test_harness_keeps_test_devices_out_of_pretraining_and_sampling(
    datasets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrained_devices: list[set[str]] = []
    original = LatencyPredictor.pretrain

    def recording_pretrain(cls: type[LatencyPredictor], space: SearchSpace | str, rows: Iterable[Row],
                           **kwargs: Any) -> LatencyPredictor:
        rows = list(rows)
        pretrained_devices.append({device for _, device, _ in rows})
        return original(space, rows, **kwargs)

    monkeypatch.setattr(LatencyPredictor, "pretrain", classmethod(recording_pretrain))
    fitted_devices: list[set[str]] = []  # every network fitted: the base and the validation folds
    original_fit = LatencyPredictor.fit

    def recording_fit(cls: type[LatencyPredictor], space: SearchSpace, table: LatencyTable,
                      **kwargs: Any) -> LatencyPredictor:
        fitted_devices.append(set(table.devices))
        return original_fit(space, table, **kwargs)

    monkeypatch.setattr(LatencyPredictor, "fit", classmethod(recording_fit))
    seen: list[dict] = []

    class SpySampler(Sampler):
        def __init__(self, name: str) -> None:
            self.inner = get_sampler(name)
            self.name = self.inner.name

        def select(self, space: SearchSpace, k: int, seed: int = 0, predictor: Embedding | None = None,
                   candidates: Sequence[str] | None = None) -> list[str]:
            seen.append({"predictor": predictor, "candidates": candidates, "k": k})
            return self.inner.select(space, k, seed=seed, predictor=predictor, candidates=candidates)

    spy = _Spy()
    validated = replace(TINY, sampler_folds=len(TRAIN))  # the choice among samplers, when asked for
    run_bench(["F0"], (5,), 1, ["ours", spy], tmp_path, config=validated, datasets=datasets,
              sampler_lookup=SpySampler, report=False)

    assert pretrained_devices == [set(TRAIN)]
    # the default sampler is chosen by holding out each train device in turn; no test device
    assert fitted_devices == [set(TRAIN), *(set(TRAIN) - {device} for device in TRAIN)]
    diagnostics = list(csv.DictReader(open(tmp_path / "diagnostics.csv")))
    validation = {(r["metric"], r["k"]) for r in diagnostics if r["metric"].startswith("validation_rho_")}
    candidates = ("design", "stratified", "random")
    assert validation == {(f"validation_rho_{s}", str(k)) for s in candidates for k in (5, 10, 20)}
    device_keys = set(load_space_table(datasets, "fbnet").keys)
    assert len(seen) == 2 * len(TEST)  # default (ours) and random (spy) sampler per device
    for call in seen:
        assert isinstance(call["predictor"], LatencyPredictor) and call["predictor"].target is None
        assert all(isinstance(key, str) for key in call["candidates"])
        assert set(call["candidates"]) == device_keys
    for samples, keys in spy.calls:
        assert len(samples) == 5 and not set(samples) & set(keys)
        assert len(samples) + len(keys) == len(device_keys)


# ---- resume -----------------------------------------------------------------------------------------


def test_resume_skips_existing_rows_and_pretraining(datasets: Path, tmp_path: Path) -> None:
    first = run_bench(["F0"], (5, 10), 2, None, tmp_path, config=TINY, datasets=datasets)
    methods = 7  # lut applies to FBNet
    assert first.rows_written == len(TEST) * 2 * 2 * methods and first.tasks_pretrained == ["F0"]
    second = run_bench(["F0"], (5, 10), 2, None, tmp_path, config=TINY, datasets=datasets)
    assert second.rows_written == 0 and second.tasks_pretrained == []
    rows = _raw_rows(tmp_path)
    cells = [(r["task"], r["device"], r["method"], r["k"], r["seed"]) for r in rows]
    assert len(cells) == len(set(cells)) == first.rows_written
    third = run_bench(["F0"], (5, 10, 20), 2, ["flops"], tmp_path, config=TINY, datasets=datasets)
    assert third.rows_written == len(TEST) * 2 and third.tasks_pretrained == []  # flops needs no base
    with pytest.raises(BenchMismatch):
        run_bench(["F0"], (5,), 1, None, tmp_path, config=TrainConfig(epochs=3, members=1, hidden=32),
                  datasets=datasets)
    with pytest.raises(ValueError, match="more than once"):
        run_bench(["F0"], (5,), 1, ["flops", "flops"], tmp_path, config=TINY, datasets=datasets)
    fresh = run_bench(["F0"], (5,), 1, ["flops"], tmp_path, config=TINY, datasets=datasets, fresh=True)
    assert fresh.rows_written == len(TEST) and len(_raw_rows(tmp_path)) == len(TEST)


def test_ridge_and_one_proxy_recover_what_they_should() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 4.0
    x_new = rng.normal(size=(50, 5))
    assert np.corrcoef(ridge_fit_predict(x, y, x_new), x_new @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]))[0, 1] > 0.99
    keys = [f"k{i}" for i in range(60)]
    reference = rng.uniform(1, 10, size=(60, 3))
    context = TaskContext(get_space("nb201"), ("a", "b", "c"), None, {k: i for i, k in enumerate(keys)}, reference)
    truth = 2.0 * reference[:, 1] ** 1.3  # device b, rescaled in log space
    samples = {keys[i]: truth[i] for i in range(10)}
    predicted = OneProxy().predict(context, "t", samples, keys[10:], 0).ms
    np.testing.assert_allclose(predicted, truth[10:], rtol=1e-6)


# ---- end to end ------------------------------------------------------------------------------------


def test_quick_cli_writes_raw_csv_summary_and_plot(datasets: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATFARM_DATASETS", str(datasets))
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "predictor", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "predictor.csv", newline="") as handle:
        assert next(csv.reader(handle)) == list(RAW_COLUMNS)
    rows = _raw_rows(out)
    assert {r["task"] for r in rows} == {"N0"} and {r["k"] for r in rows} == {"5", "20"}
    assert {r["seed"] for r in rows} == {"0"} and "lut" not in {r["method"] for r in rows}
    markdown = (out / "predictor.md").read_text()
    assert "| N0 |" in markdown and "nasflat" in markdown
    # the published figure below k=20, where tasks.json has one, against ours at that k
    with open(out / "summary.csv", newline="") as handle:
        ours_k5 = float(next(csv.DictReader(handle))["ours_k5"])
    # summary.csv keeps 4 decimals, the report 3 of the unrounded mean
    shown = re.search(r"^\| N0 \| (\d\.\d{3}) \| 0\.500 \|", markdown, re.MULTILINE)
    assert shown is not None and abs(float(shown.group(1)) - ours_k5) <= 0.00051, markdown
    assert f"on {int(round(ours_k5, 3) >= 0.5)} of the 1 tasks with a published figure at that k" in markdown
    assert (out / "summary.csv").is_file() and (out / "predictor.png").stat().st_size > 1000
    # --k takes several values after one flag
    again = CliRunner().invoke(app, ["bench", "predictor", "--tasks", "N0", "--k", "5", "10", "--seeds", "1",
                                     "--methods", "flops", "--out", str(tmp_path / "k")])
    assert again.exit_code == 0, again.output
    assert {r["k"] for r in _raw_rows(tmp_path / "k")} == {"5", "10"}


@pytest.mark.slow
def test_quick_on_the_real_tables(tmp_path: Path) -> None:
    run_bench(quick=True, out_dir=tmp_path, datasets=REAL_DATASETS)
    rows = _raw_rows(tmp_path)
    assert len(rows) == 6 * 2 * 6  # N0: 6 test devices, k in (5, 20), 6 methods
    ours = [float(r["spearman"]) for r in rows if r["method"] == "ours" and r["k"] == "20"]
    assert np.mean(ours) > 0.8
