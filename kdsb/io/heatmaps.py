"""Heatmap files: one 3D map per patient on its volume's grid (`kdsb explain` writes them).

`<id>.h5` holds dataset `heatmap` (float32, shape (z, y, x), the volume's shape) and the
attributes `spacing` and `origin` (mm, (z, y, x)) of the volume it explains, plus any others
given (`kdsb explain` writes the method, the models' absolute paths and the patient's
probability): `explain_runs` groups a folder's heatmaps by the run that wrote them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import h5py
import numpy as np

from kdsb.errors import StoreError, one_line
from kdsb.io.atomic import atomic_path
from kdsb.io.tables import summarise_ids
from kdsb.io.volumes import COMPRESSION, H5_DAMAGE_ERRORS, REQUIRED_DATASETS, check_geometry

HEATMAP_DATASET = "heatmap"
SUFFIX = ".h5"
# What tells one explain run's heatmaps from another's: the digest of the run's fingerprint
# (its models' contents, method and sizes: `kdsb.evaluation.explain`), its method and models.
RUN_ATTRS = ("run", "method", "models")


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


def explain_run(path: str | os.PathLike) -> tuple[str, ...] | None:
    """The explain run a heatmap file came from: its `RUN_ATTRS` (the run's digest, the
    method, then the models' paths), as text ("" for a missing one); None where the file
    cannot be read (its reader names it)."""
    try:
        with h5py.File(path, "r") as f:
            run, method = (str(f.attrs.get(name, "")) for name in RUN_ATTRS[:2])
            models = f.attrs.get("models", ())
            models = [models] if isinstance(models, str | bytes) else list(models)
            return (run, method,
                    *(m.decode() if isinstance(m, bytes) else str(m) for m in models))
    except H5_DAMAGE_ERRORS:
        return None


def explain_runs(
    paths: Iterable[tuple[str, str | os.PathLike]],
) -> dict[tuple[str, ...], list[str]]:
    """The heatmaps of (patient id, heatmap path) pairs grouped by `explain_run`: run → ids;
    unreadable ones left out."""
    runs: dict[tuple[str, ...], list[str]] = {}
    for patient_id, path in paths:
        run = explain_run(path)
        if run is not None:
            runs.setdefault(run, []).append(patient_id)
    return runs


def describe_runs(runs: Mapping[tuple[str, ...], list[str]]) -> str:
    """One line naming each run of `explain_runs`: its method, models and patients (and its
    digest where two runs share those: a model retrained in place, other occlusion sizes)."""
    shown = [key[1:] for key in runs]

    def run(key: tuple[str, ...], ids: list[str]) -> str:
        what = f"{key[1] or 'no method'} of {', '.join(key[2:]) or 'no models named'}"
        if shown.count(key[1:]) > 1:
            what += f" (run {key[0][:12] or 'unnamed'})"
        return f"{len(ids)} by {what} ({summarise_ids(ids)})"

    return "; ".join(run(key, ids) for key, ids in runs.items())
