"""The LODO bench's summary: lodo.md (mean per space, method and k) and lodo.png (rho against k)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from predictor.reference import DEAD_CODE_THRESHOLD

from .lodo import RAW_FILE
from .methods import METHODS

MARKDOWN_FILE = "lodo.md"
PLOT_FILE = "lodo.png"
METRICS = ("spearman", "kendall", "mape", "within10", "coverage90", "calibration_rho")
#: what a section of the report says of a reading (`predictor.bench.lodo.READINGS`)
READING_NOTES = {
    "per_network": "Each network timed once, as the farm measures a device: every key the target measured "
                   "is given its network's latency on it (the mean over the keys building it; on a device "
                   "that charges for dead code, over those without any), `ours` reads the device per network "
                   "as the farm does, the baselines read the reference devices per network too, and the keys "
                   "of a sampled network are measured, not scored.",
}
Cell = tuple[str, str, str, int]  # (space, reading, method, k)


def summarise(rows: list[dict[str, str]]) -> dict[Cell, dict[str, float]]:
    """(space, reading, method, k) -> mean of each metric over devices and seeds, the spread over
    seeds of the device-mean rho, and the counts of devices and seeds."""
    grouped: dict[Cell, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        grouped[(row["space"], row["reading"], row["method"], int(row["k"]))].append(row)
    out = {}
    for key, cell in grouped.items():
        summary = {m: _mean([r[m] for r in cell]) for m in METRICS}
        if METHODS[key[2]].ranks_only:  # older rows scored its relative errors too
            summary["mape"] = summary["within10"] = math.nan
        by_seed: dict[str, list[float]] = defaultdict(list)
        for r in cell:
            by_seed[r["seed"]].append(float(r["spearman"]) if r["spearman"] else math.nan)
        seed_means = [np.nanmean(v) for v in by_seed.values()]
        summary["spread"] = float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else math.nan
        summary["devices"] = len({r["device"] for r in cell})
        summary["seeds"] = len(by_seed)
        out[key] = summary
    return out


def _mean(values: list[str]) -> float:
    numbers = [float(v) for v in values if v != ""]
    return float(np.mean(numbers)) if numbers else math.nan


def write_lodo_report(out_dir: str | Path, datasets: Path | None = None) -> dict[Cell, dict[str, float]]:
    out = Path(out_dir)
    with open(out / RAW_FILE, newline="") as handle:
        summary = summarise(list(csv.DictReader(handle)))
    (out / MARKDOWN_FILE).write_text(_markdown(summary) + _dead_code(datasets))
    _plot(out / PLOT_FILE, summary)
    return summary


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def _sections(summary: dict[Cell, dict[str, float]]) -> list[tuple[str, str]]:
    """The (space, reading) pairs of the summary, as timed first."""
    return sorted({(space, reading) for space, reading, _, _ in summary}, key=lambda sr: (sr[1] != "as_timed", sr))


def _title(space: str, reading: str) -> str:
    return space if reading == "as_timed" else f"{space}, {reading.replace('_', ' ')}"


def _markdown(summary: dict[Cell, dict[str, float]]) -> str:
    lines = ["# Leave-one-device-out bench", "",
             "Every reference device of a space in turn is the target; the base is pre-trained on the others; "
             "k samples drawn by the base's default sampler from all the target's architectures, the rest scored. "
             "Means over devices and seeds; spread: std over seeds of the device-mean rho. "
             "Written by `latfarm bench predictor --lodo` from lodo.csv.", ""]
    for space, reading in _sections(summary):
        note = READING_NOTES.get(reading, "")
        lines += [f"## {_title(space, reading)}", "", *([note, ""] if note else []),
                  *_table(summary, space, reading), ""]
    return "\n".join(lines) + "\n"


def _table(summary: dict[Cell, dict[str, float]], space: str, reading: str) -> list[str]:
    lines = ["| method | k | devices | seeds | rho | spread | tau | MAPE % | ±10 % | 90 % coverage | rho(std, err) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ours_first = sorted(summary.items(), key=lambda item: (item[0][2] != "ours", item[0][2], item[0][3]))
    for (s, r, method, k), row in ours_first:
        if (s, r) != (space, reading):
            continue
        lines.append(f"| {method} | {k} | {row['devices']} | {row['seeds']} | {_fmt(row['spearman'])} | "
                     f"{_fmt(row['spread'])} | {_fmt(row['kendall'])} | {_fmt(row['mape'], 1)} | "
                     f"{_fmt(row['within10'])} | {_fmt(row['coverage90'])} | {_fmt(row['calibration_rho'])} |")
    return lines


def _dead_code(datasets: Path | None) -> str:
    """Per NB201 reference device: how much longer keys holding dead code took than the same
    network without it (the tables timed every cell as written)."""
    from predictor.datasets import find_datasets
    from predictor.reference import LatencyTable, MeasuredReference

    from .data import load_space_table

    table = load_space_table(datasets or find_datasets(), "nb201")
    devices = sorted(table.latencies)
    with np.errstate(divide="ignore"):
        log_ms = np.log(table.matrix(devices)).astype(np.float32)
    cost = MeasuredReference.of(table.space, LatencyTable(table.keys, devices, log_ms)).dead_code_cost
    lines = ["## Does dead code cost? (NB201 reference tables)", "",
             "Mean log-latency excess of keys holding dead code (edges no input-output path uses) over the same "
             f"network timed without it; above {DEAD_CODE_THRESHOLD:.0%} a device is taken to charge for it, and its "
             "per-network latency is read from dead-code-free keys only.", "",
             "| device | excess | charges |", "|---|---|---|"]
    lines += [f"| {d} | {100 * c:+.1f} % | {'yes' if c > DEAD_CODE_THRESHOLD else 'no'} |"
              for d, c in zip(devices, cost)]
    return "\n".join(lines) + "\n"


def _plot(path: Path, summary: dict[Cell, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = _sections(summary)
    fig, axes = plt.subplots(1, len(sections), figsize=(4.2 * len(sections), 3.2), squeeze=False)
    for ax, (space, reading) in zip(axes[0], sections):
        cells = [(m, k) for s, r, m, k in summary if (s, r) == (space, reading)]
        for method in sorted({m for m, _ in cells}):
            ks = sorted(k for m, k in cells if m == method)
            means = [summary[(space, reading, method, k)]["spearman"] for k in ks]
            spreads = np.nan_to_num([summary[(space, reading, method, k)]["spread"] for k in ks])
            ax.errorbar(ks, means, yerr=spreads, marker="o", ms=3, capsize=2, label=method)
        ax.set_xscale("log")
        ax.set_xticks(sorted({k for _, k in cells}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{_title(space, reading)}: leave one device out", fontsize=9)
        ax.set_xlabel("k (measured samples)", fontsize=8)
        ax.set_ylabel("mean Spearman rho", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
