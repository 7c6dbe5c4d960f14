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


def test_scatter_plot_draws_trusted_and_flagged_points(tmp_path: Path) -> None:
    measured = np.asarray([0.3, 1.0, 2.0, 4.0])
    trusted = np.asarray([False, True, True, False])
    for mask, name in ((trusted, "mixed.png"), (np.zeros(4, dtype=bool), "all_flagged.png")):
        path = tmp_path / name
        scatter_plot(path, measured, measured * 1.1, mask, "device: rho=1.000")
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (600, 600)
