"""Training plots: loss curves and GMCAE reconstructions, written as PNG files.

Figures are drawn with `matplotlib.figure.Figure` directly (no pyplot), so plotting works in
worker processes and on machines without a display, and never touches global state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kdsb.errors import KdsbError
from kdsb.io.atomic import save_figure

DPI = 100
CURVE_SIZE_INCHES = (6.0, 4.0)
PANEL_INCHES = 1.6
# Normalised HU shown in reconstructions: -1 is air (-1000 HU), +1 is 400 HU (kdsb.data.patches).
NORMALIZED_RANGE = (-1.0, 1.0)


def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    *,
    ylabel: str = "loss",
    title: str | None = None,
    baselines: Mapping[str, float] | None = None,
) -> Path:
    """Plot one line per named curve against the epoch (counted from 1) and save a PNG.

    Args:
        curves: curve name → one value per epoch (e.g. {"train": [...], "validation": [...]});
            non-finite values are left out of the line.
        path: the PNG to write.
        ylabel: label of the vertical axis (say the unit, e.g. "NLL per voxel (nats)").
        title: figure title.
        baselines: name → constant drawn as a dashed horizontal line (e.g. a reference model).

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=CURVE_SIZE_INCHES, dpi=DPI, layout="constrained")
    axes = figure.subplots()
    for name, values in curves.items():
        values = np.asarray(values, dtype=np.float64)
        epochs = np.arange(1, len(values) + 1)
        finite = np.isfinite(values)
        axes.plot(epochs[finite], values[finite], marker="o", markersize=3, label=name)
    for name, value in (baselines or {}).items():
        axes.axhline(value, linestyle="--", color="grey", label=name)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    if title:
        axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    return save_figure(figure, path)


def plot_reconstructions(
    originals: np.ndarray,
    reconstructions: np.ndarray,
    path: str | os.PathLike,
    *,
    value_range: tuple[float, float] = NORMALIZED_RANGE,
    title: str | None = None,
) -> Path:
    """Central slices of 3D patches beside their reconstructions, one patch per row.

    Each row shows the central axial (z), coronal (y) and sagittal (x) slice of the original
    patch, then the same three slices of its reconstruction, on one grey scale.

    Args:
        originals: (n, z, y, x) or (n, z, y, x, 1) patches (normalised HU).
        reconstructions: same shape.
        path: the PNG to write.
        value_range: grey-scale limits (normalised HU; values outside are clipped in display).
        title: figure title.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    originals = np.asarray(originals)
    reconstructions = np.asarray(reconstructions)
    if originals.shape != reconstructions.shape:
        raise KdsbError(
            f"expected reconstructions of shape {originals.shape}, received {reconstructions.shape}"
        )
    if originals.ndim == 5:
        originals, reconstructions = originals[..., 0], reconstructions[..., 0]
    rows = len(originals)
    views = ("axial", "coronal", "sagittal")
    figure = Figure(
        figsize=(2 * len(views) * PANEL_INCHES, rows * PANEL_INCHES + 0.5),
        dpi=DPI,
        layout="constrained",
    )
    axes = figure.subplots(rows, 2 * len(views), squeeze=False)
    for row in range(rows):
        for column, (kind, volume) in enumerate(
            (("original", originals[row]), ("reconstruction", reconstructions[row]))
        ):
            centre = np.array(volume.shape) // 2
            slices = (volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]])
            for view, (name, image) in enumerate(zip(views, slices, strict=True)):
                ax = axes[row, column * len(views) + view]
                # Coronal and sagittal rows run along z, inferior → superior: superior on top.
                ax.imshow(image, cmap="gray", vmin=value_range[0], vmax=value_range[1],
                          origin="upper" if view == 0 else "lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"{kind}\n{name}", fontsize=8)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)
