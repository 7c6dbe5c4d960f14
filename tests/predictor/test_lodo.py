"""The leave-one-device-out bench on the real reference tables: its rows, resume and report, and
the calibration of the adapted predictor's uncertainty on held-out reference devices."""

from __future__ import annotations

import csv
import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from predictor import get_sampler, metrics
from predictor.bench.data import load_space_table, memoised_space
from predictor.bench.lodo import COLUMNS, METHODS, RAW_FILE, READINGS, fold_base, read_device, run_lodo
from predictor.datasets import find_datasets

pytestmark = pytest.mark.slow


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / RAW_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_lodo_writes_a_row_per_cell_resumes_and_reports(tmp_path: Path) -> None:
    devices = ["eyeriss", "embedded_tpu_edge_tpu_int8"]
    result = run_lodo(spaces=["nb201"], devices=devices, ks=[5, 20], seeds=1, out_dir=tmp_path)
    rows = _rows(tmp_path)
    # NB201's keys share networks, so each device is read both ways
    assert result.rows_written == len(rows) == len(devices) * 2 * len(METHODS) * len(READINGS)
    assert set(rows[0]) == set(COLUMNS)
    ours = [r for r in rows if r["method"] == "ours" and r["reading"] == "as_timed"]
    # the adaptation reads the reference devices' latencies from the tables (all but 3 of the
    # 40 NB201 devices measured every architecture), the network fills only their gaps
    assert all(float(r["measured_share"]) >= 0.9 for r in ours)
    assert np.mean([float(r["spearman"]) for r in ours if r["k"] == "20"]) > 0.85
    per_network = [r for r in rows if r["method"] == "ours" and r["reading"] == "per_network"]
    assert np.mean([float(r["spearman"]) for r in per_network if r["k"] == "20"]) > 0.9
    again = run_lodo(spaces=["nb201"], devices=devices, ks=[5, 20], seeds=1, out_dir=tmp_path)
    assert again.rows_written == 0 and len(_rows(tmp_path)) == len(rows)
    markdown = (tmp_path / "lodo.md").read_text()
    as_timed, farm_reading = markdown.split("## nb201, per network")
    assert "| ours | 20 | 2 | 1 |" in as_timed and "| ours | 20 | 2 | 1 |" in farm_reading
    assert (tmp_path / "lodo.png").stat().st_size > 1000


def test_read_per_network_a_device_gives_each_network_one_latency() -> None:
    """The farm's reading of a held-out device: the keys building one network share its latency,
    on the target and on every reference device; Eyeriss charges for dead code (35 %), so its
    network's latency is that of the keys without any, as the farm's export of the network would
    be timed."""
    table = load_space_table(find_datasets(), "nb201")
    space = memoised_space(table.space, table.keys)
    device = "eyeriss"
    context, truth = read_device("per_network", space, table, device, fold_base(space, table, device))
    networks: dict[str, list[str]] = defaultdict(list)
    for key in truth:
        networks[space.network_key(key)].append(key)
    keys = next(group for group in networks.values()
                if len(group) > 2 and 0 < sum(space.live_key(key) == key for key in group) < len(group))
    assert context.per_network and len({truth[key] for key in keys}) == 1
    reference = context.reference_ms(keys)
    assert np.isfinite(reference).all() and np.allclose(reference, reference[0])
    as_timed = table.device_truth(device)
    without_dead_code = [as_timed[key] for key in keys if space.live_key(key) == key]
    assert np.isclose(np.log(truth[keys[0]]), np.mean(np.log(without_dead_code)), atol=1e-5)
    assert truth[keys[0]] < max(as_timed[key] for key in keys)


def test_uncertainty_ranks_the_errors_on_held_out_reference_devices() -> None:
    """k=20 on held-out NB201 devices: the noise shaped by the reference devices' disagreement
    ranks the errors better than one noise for every architecture would (0.405 against 0.390
    here; 0.05 apart before the noise floor became a scale of the whole posterior, whose model
    uncertainty now ranks them too), above the 0.3 asked of it, and the 90 % interval holds
    close to 90 % of the truths. With random samples: with the design sampler's, the default,
    the LODO bench measures 0.214 on NB201 at k=20 (docs/bench/lodo.md), short of the 0.3."""
    table = load_space_table(find_datasets(), "nb201")
    space = memoised_space(table.space, table.keys)
    shaped, flat, covered = [], [], []
    for device in sorted(table.latencies)[::8]:
        base = fold_base(space, table, device)
        truth = table.device_truth(device)
        picked = get_sampler("random").select(space, 20, seed=0, candidates=list(truth))
        adapted = base.adapt({key: truth[key] for key in picked}, name=device, per_network=False)
        held_out = [key for key in truth if key not in set(picked)]
        measured = np.asarray([truth[key] for key in held_out])
        ms, std = adapted.predict(held_out)
        assert adapted.target is not None
        one_noise = dataclasses.replace(adapted.target, similarity=None)
        design = adapted.design(held_out, per_network=False)[0]
        _, flat_log_std = one_noise.log_ms(design)
        shaped.append(metrics.calibration_rho(ms, std, measured))
        flat.append(metrics.calibration_rho(ms, ms * flat_log_std, measured))
        covered.append(metrics.coverage(ms, std, measured))
    assert np.mean(shaped) > np.mean(flat)
    assert np.mean(shaped) > 0.3
    assert 0.8 <= np.mean(covered) <= 0.97


def test_a_mis_measured_sample_is_suspect_and_measured_right_it_is_not() -> None:
    """Of 20 design samples of a held-out FBNet device, one measured twice as slow: the fit finds
    it suspect (`LatencyPredictor.suspect_samples`, what onboarding measures again) and no other;
    measured right, nothing is suspect. Below 10 samples nothing is: the fit's noise is not
    known well enough to tell."""
    table = load_space_table(find_datasets(), "fbnet")
    space = memoised_space(table.space, table.keys)
    device = "raspi4"
    base = fold_base(space, table, device)
    truth = table.device_truth(device)
    picked = get_sampler("default").select(space, 20, seed=0, predictor=base, candidates=list(truth))
    samples = {key: truth[key] for key in picked}
    victim = sorted(picked, key=samples.__getitem__)[len(picked) // 2]
    mis_measured = {**samples, victim: 2 * samples[victim]}
    assert base.adapt(mis_measured, name=device).suspect_samples() == [base.network_key(victim)]
    assert base.adapt(samples, name=device).suspect_samples() == []
    few = [key for key in picked if key != victim][:8] + [victim]
    assert base.adapt({key: mis_measured[key] for key in few}, name=device).suspect_samples() == []
