"""The demo's check: scored on every held-out measurement and on the trusted ones alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.cli.demo import check_score, scatter_plot


def test_check_score_ranks_and_measures_relative_error() -> None:
    measured = np.asarray([1.0, 2.0, 4.0, 8.0])
    score = check_score(measured, measured * np.asarray([1.1, 0.9, 1.0, 1.2]))
    assert score is not None
    assert score.rho == pytest.approx(1.0)
    assert score.mape == pytest.approx((10 + 10 + 0 + 20) / 4)
    reversed_score = check_score(measured, measured[::-1].copy())
    assert reversed_score is not None and reversed_score.rho == pytest.approx(-1.0)


def test_check_score_needs_three_points() -> None:
    assert check_score(np.asarray([1.0, 2.0]), np.asarray([1.0, 2.0])) is None


def test_scatter_plot_marks_the_flagged_points(tmp_path: Path) -> None:
    measured = np.asarray([0.3, 1.0, 2.0, 4.0])
    plots = {"all_trusted": np.ones(4, dtype=bool), "mixed": np.asarray([False, True, True, False]),
             "all_flagged": np.zeros(4, dtype=bool)}
    for name, trusted in plots.items():
        scatter_plot(tmp_path / f"{name}.png", measured, measured * 1.1, trusted, "device: rho=1.000")
    # the legend shows both markers on every plot: count the flagged markers' orange (tab:orange at
    # alpha 0.8 over white) instead
    orange_pixels = {}
    for name in plots:
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.format == "PNG"
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        orange_pixels[name] = int((np.abs(pixels - np.asarray([255, 153, 62])).sum(axis=2) < 40).sum())
    assert orange_pixels["all_trusted"] < orange_pixels["mixed"] < orange_pixels["all_flagged"]
