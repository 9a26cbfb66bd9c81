"""Heatmap files: one 3D map per patient on its volume's grid (`kdsb explain` writes them).

`<id>.h5` holds dataset `heatmap` (float32, shape (z, y, x), the volume's shape) and the
attributes `spacing` and `origin` (mm, (z, y, x)) of the volume it explains, plus any others
given (the method, the models, the patient's probability).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from kdsb.errors import StoreError, one_line
from kdsb.io.atomic import atomic_path
from kdsb.io.volumes import COMPRESSION, H5_DAMAGE_ERRORS, REQUIRED_DATASETS, check_geometry

HEATMAP_DATASET = "heatmap"
SUFFIX = ".h5"


def heatmap_path(folder: str | os.PathLike, patient_id: str) -> Path:
    """The path of a patient's heatmap file in `folder`."""
    return Path(folder) / f"{patient_id}{SUFFIX}"


def holds_volume(path: str | os.PathLike) -> bool:
    """Whether `path` is an existing kdsb volume file (HU and lung mask), which a heatmap
    written there would replace."""
    try:
        with h5py.File(path, "r") as f:
            return all(name in f for name in REQUIRED_DATASETS)
    except H5_DAMAGE_ERRORS:  # missing, not HDF5, or damaged
        return False


def write_heatmap(
    path: str | os.PathLike,
    heatmap: np.ndarray,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    attrs: Mapping[str, object] | None = None,
) -> Path:
    """Write a heatmap (z, y, x) with its grid's spacing and origin (mm) atomically."""
    path = Path(path)
    with atomic_path(path) as temp, h5py.File(temp, "w") as f:
        f.create_dataset(HEATMAP_DATASET, data=np.asarray(heatmap, dtype=np.float32),
                         **COMPRESSION)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        # Last: the grid's geometry is the contract's, whatever `attrs` holds (as volumes).
        f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
        f.attrs["origin"] = np.asarray(origin, dtype=np.float64)
    return path


def read_heatmap(path: str | os.PathLike) -> tuple[np.ndarray, tuple, tuple]:
    """Read a heatmap file: (heatmap float32 (z, y, x), spacing mm, origin mm).

    Raises:
        StoreError: a missing or unreadable file, or one without the heatmap or its geometry.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"expected a heatmap file, received a missing path: {path}")
    try:
        with h5py.File(path, "r") as f:
            if not (isinstance(f.get(HEATMAP_DATASET), h5py.Dataset)
                    and {"spacing", "origin"} <= set(f.attrs)):
                raise StoreError(
                    f"{path}: expected dataset '{HEATMAP_DATASET}' with spacing and origin "
                    f"attributes, received {sorted(f)} and {sorted(f.attrs)}"
                )
            check_geometry(path, f.attrs["spacing"], f.attrs["origin"])
            if f[HEATMAP_DATASET].ndim != 3:
                raise StoreError(f"{path}: expected a 3D heatmap (z, y, x), received shape "
                                 f"{f[HEATMAP_DATASET].shape}")
            heatmap = f[HEATMAP_DATASET][...].astype(np.float32, copy=False)
            spacing = tuple(float(s) for s in f.attrs["spacing"])
            origin = tuple(float(o) for o in f.attrs["origin"])
    except StoreError:
        raise
    except (*H5_DAMAGE_ERRORS, ValueError) as error:
        raise StoreError(f"{path}: expected a heatmap file, received an unreadable or damaged "
                         f"one ({one_line(error)})") from error
    return heatmap, spacing, origin
