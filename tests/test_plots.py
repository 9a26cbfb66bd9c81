"""Tests for kdsb.training.plots: loss curves and reconstruction panels as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.image import imread

from kdsb.errors import KdsbError
from kdsb.training import plots


def test_plot_loss_curves_skips_non_finite_values(tmp_path, monkeypatch):
    drawn = {}
    real_plot = Axes.plot

    def spy(self, x, y, *args, label=None, **kwargs):
        drawn[label] = (list(x), list(y))
        return real_plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    path = plots.plot_loss_curves(
        {"train": [1.0, float("nan"), 0.5, float("inf")], "validation": [1.1, 0.6, 0.55]},
        tmp_path / "loss.png",
        baselines={"baseline": 0.9},
    )
    # Epochs count from 1; the non-finite values are left out, the line joins their neighbours.
    assert drawn == {"train": ([1, 3], [1.0, 0.5]), "validation": ([1, 2, 3], [1.1, 0.6, 0.55])}
    width, height = plots.CURVE_SIZE_INCHES
    assert imread(path).shape[:2] == (round(height * plots.DPI), round(width * plots.DPI))


def test_a_figure_that_fails_to_save_leaves_no_file(tmp_path, monkeypatch):
    """Plots are saved atomically: a kill or a full disk while writing leaves no truncated
    PNG where the last good one was (found in review)."""
    from matplotlib.figure import Figure

    path = plots.plot_loss_curves({"train": [1.0, 0.5]}, tmp_path / "loss.png")
    before = path.read_bytes()

    def full_disk(self, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space left"):
        plots.plot_loss_curves({"train": [1.0, 0.4]}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_plot_reconstructions_draws_one_row_per_patch_and_checks_shapes(tmp_path):
    patches = np.zeros((2, 8, 8, 8, 1), np.float32)
    patches[1] = 1.0  # white in the second row only
    path = plots.plot_reconstructions(patches, patches, tmp_path / "r.png")
    image = imread(path)[..., :3].mean(axis=-1)
    columns = 2 * 3  # original and reconstruction, three views each
    assert image.shape == (
        round((2 * plots.PANEL_INCHES + 0.5) * plots.DPI),
        round(columns * plots.PANEL_INCHES * plots.DPI),
    )
    # Mid-grey panels (0) in the first row, white ones (1) in the second.
    top, bottom = image[: image.shape[0] // 2], image[image.shape[0] // 2 :]
    assert np.count_nonzero(bottom > 0.99) > np.count_nonzero(top > 0.99) + 6 * 50**2
    with pytest.raises(KdsbError, match="expected reconstructions of shape"):
        plots.plot_reconstructions(patches, patches[:1], tmp_path / "bad.png")
