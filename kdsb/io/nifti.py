"""NIfTI export for viewers: kdsb volumes, lung masks and heatmaps at the scanner's position.

kdsb arrays are (z, y, x) in DICOM patient coordinates (LPS: x grows to the patient's left,
y to the posterior, z to the head; `origin` is voxel [0, 0, 0], mm). NIfTI stores (i, j, k) =
(x, y, z) and an affine into RAS world coordinates (x to the right, y to the anterior), so the
affine negates x and y: RAS = (-L, -P, S). 3D Slicer and ITK-SNAP then show an exported volume
where the original DICOM series lies, and the HU volume, lung mask and heatmap of one patient
overlay each other. Written with nibabel (qform and sform both "scanner", units mm).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, StoreError, UsageError, one_line
from kdsb.hu import LUNG_WINDOW_HU
from kdsb.io import volumes
from kdsb.io.atomic import atomic_path, remove_stale_temporaries, sole_writer
from kdsb.io.heatmaps import describe_runs, explain_runs, heatmap_path, read_heatmap
from kdsb.io.series import LPS_TO_RAS
from kdsb.io.tables import summarise_ids

logger = logging.getLogger(__name__)

NIFTI_SUFFIX = ".nii.gz"
SCANNER_XFORM = 1  # NIfTI xform code: scanner-based anatomical coordinates
GEOMETRY_ATOL_MM = 1e-3  # a heatmap's grid must match its volume's to this, mm
EXPORT_LOCK = ".kdsb-export.lock"  # held by the export writing OUT_DIR


def ras_affine(spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """The 4×4 NIfTI affine of a canonical kdsb grid: voxel (i, j, k) = (x, y, z) → RAS mm.

    Args:
        spacing: voxel size (z, y, x), mm.
        origin: LPS patient coordinate of voxel [0, 0, 0], (z, y, x), mm.
    """
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ np.diag([float(s) for s in spacing[::-1]])
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin[::-1], dtype=np.float64)
    return affine


def write_nifti_set(
    arrays: Mapping[str | os.PathLike, np.ndarray],
    spacing: Sequence[float],
    origin: Sequence[float],
    display: Mapping[str | os.PathLike, tuple[float, float]] | None = None,
) -> list[Path]:
    """Write path → (z, y, x) array as NIfTI-1 files on one grid, as a set: every file is
    written to its temporary before any is renamed into place, so a failed write (a full disk)
    leaves each target as it was, never a new volume beside an old mask. `display`: path →
    (low, high), the header's `cal_min`/`cal_max`, the range a viewer that reads them shows."""
    import nibabel as nib

    affine = ras_affine(spacing, origin)
    with contextlib.ExitStack() as renames:  # on leaving: every rename, or every temp removed
        for path, array in arrays.items():
            data = np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))
            image = nib.Nifti1Image(data, affine)
            image.set_qform(affine, code=SCANNER_XFORM)
            image.set_sform(affine, code=SCANNER_XFORM)
            image.header.set_xyzt_units(xyz="mm")
            if display and path in display:
                image.header["cal_min"], image.header["cal_max"] = display[path]
            nib.save(image, renames.enter_context(atomic_path(path)))
    return [Path(path) for path in arrays]


def export_patient(
    volume_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    patient_id: str,
    heatmaps_dir: str | os.PathLike | None = None,
    drop_heatmap: bool = False,
) -> list[Path]:
    """Write `<id>_hu.nii.gz`, `<id>_lung_mask.nii.gz` and, with `heatmaps_dir`,
    `<id>_heatmap.nii.gz` into `out_dir` (all or none: `write_nifti_set`); returns the files
    written. Without `heatmaps_dir`, an earlier export's heatmap stays where it lies on the
    volume's grid, unless `drop_heatmap` (its `--heatmaps DIR` holds none of this patient).

    Raises:
        StoreError: an unreadable volume or heatmap file, a heatmap on another grid, or a
            write that failed.
    """
    volume = volumes.read_volume(volume_file)
    out_dir = Path(out_dir)
    grid = (volume.spacing, volume.origin)
    heatmap = None
    if heatmaps_dir is not None:
        heatmap, spacing, origin = read_heatmap(heatmap_path(heatmaps_dir, patient_id))
        same_grid = heatmap.shape == volume.hu.shape and np.allclose(
            (spacing, origin), grid, atol=GEOMETRY_ATOL_MM
        )
        if not same_grid:
            raise StoreError(
                f"{patient_id}: expected a heatmap on the volume's grid {volume.hu.shape}, "
                f"spacing {volume.spacing}, origin {volume.origin}; received {heatmap.shape}, "
                f"spacing {spacing}, origin {origin}"
            )
    heatmap_file = out_dir / f"{patient_id}_heatmap{NIFTI_SUFFIX}"
    hu_file = out_dir / f"{patient_id}_hu{NIFTI_SUFFIX}"
    mask_file = out_dir / f"{patient_id}_lung_mask{NIFTI_SUFFIX}"
    arrays = {hu_file: volume.hu, mask_file: volume.lung_mask.astype(np.uint8)}
    # Display ranges (found by a user's trial: none, viewers autoscaled): the lung window, the
    # mask's 0–1, the heatmap's 0 to 1 (`explain` scales each map to a maximum of 1).
    display = {hu_file: LUNG_WINDOW_HU, mask_file: (0.0, 1.0), heatmap_file: (0.0, 1.0)}
    if heatmap is not None:
        arrays[heatmap_file] = heatmap
    if out_dir.is_dir():  # a killed export's temporaries of this patient's files
        remove_stale_temporaries(out_dir, {path.name for path in [*arrays, heatmap_file]})
    try:
        if heatmap is None and drop_heatmap:  # first: a kill leaves no heatmap of another run
            heatmap_file.unlink(missing_ok=True)
        written = write_nifti_set(arrays, *grid, display=display)
        if heatmap is None:
            _remove_heatmap_of_another_grid(heatmap_file, volume.hu.shape, grid)
        return written
    except OSError as error:  # a full or read-only disk: this patient fails, its files as they were
        raise StoreError(f"{patient_id}: expected to write its NIfTI files into {out_dir}, "
                         f"received an error: {error}") from error


def _remove_heatmap_of_another_grid(path: Path, shape: Sequence[int],
                                    grid: tuple[Sequence[float], Sequence[float]]) -> None:
    """Remove an earlier export's heatmap that no longer lies on its patient's grid (the
    volume preprocessed again since, exported without --heatmaps): a viewer would overlay it on
    the wrong voxels (found in review). One on the same grid stays, with a note."""
    import nibabel as nib

    if not path.is_file():
        return
    try:
        header = nib.load(path).header
        same = tuple(header.get_data_shape())[::-1] == tuple(shape) and np.allclose(
            header.get_best_affine(), ras_affine(*grid), atol=GEOMETRY_ATOL_MM)
    except Exception:  # noqa: BLE001 - unreadable: not this export's either way
        same = False
    if same:
        logger.info("%s: kept, an earlier export's heatmap on this volume's grid", path)
        return
    path.unlink()
    logger.warning("%s: removed, an earlier export's heatmap on another grid than the volume "
                   "exported now (export --heatmaps again to have one)", path)


def export_cohort(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    ids: Iterable[str] | None = None,
    heatmaps_dir: str | os.PathLike | None = None,
    ids_source: str = "ids",
) -> tuple[list[str], dict[str, str]]:
    """Export every patient of `data_dir` (or only `ids`, read from `ids_source`, named in
    messages) as NIfTI into `out_dir`.

    A patient that fails (an unreadable volume file or heatmap, a heatmap on another grid)
    gets a one-line reason and the others go on; files already written are never left
    half-written. With `heatmaps_dir`, patients it holds no heatmap of (`kdsb explain --ids`
    explained a few) are exported without one, in one warning. The run holds
    `out_dir/EXPORT_LOCK` against another export into the same folder.

    Returns:
        (ids exported, {id: reason} for the patients that failed).

    Raises:
        UsageError: no volume file in `data_dir`, no heatmap file in `heatmaps_dir`, heatmaps
            of more than one explain run among the patients' (`heatmaps.explain_runs`), or
            another export writing `out_dir`.
        LabelsError: an id of `ids` without a volume file (before anything is written).
    """
    available = volumes.list_volumes(data_dir)
    if not available:  # found by a user's check: "exported 0 patient(s)", exit 0
        raise UsageError(f"expected kdsb volume files (<id>.h5) in {data_dir}, received none")
    if heatmaps_dir is not None and not volumes.list_volumes(heatmaps_dir):
        raise UsageError(f"expected --heatmaps DIR, a folder of kdsb explain heatmaps "
                         f"(<id>.h5), received none in {heatmaps_dir}")
    # An id without a volume is refused before anything is written, as explain and predict
    # refuse it (found by a user's trial: export failed that patient alone, explain the run).
    wanted, _ = volumes.resolve_ids(Path(data_dir), None if ids is None else list(ids),
                                    ids_source)
    if heatmaps_dir is not None:
        # Found in review: `explain` of a few patients with another model into an earlier
        # run's folder left the others' heatmaps, and they were exported side by side.
        runs = explain_runs((i, heatmap_path(heatmaps_dir, i)) for i in wanted
                            if heatmap_path(heatmaps_dir, i).exists())
        if len(runs) > 1:
            raise UsageError(f"expected --heatmaps DIR holding one explain run's heatmaps, "
                             f"received {len(runs)} runs' in {heatmaps_dir}: "
                             f"{describe_runs(runs)}; explain into a folder of its own")
    exported: list[str] = []
    failed: dict[str, str] = {}
    without_heatmap: list[str] = []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Found in review: two exports into one folder (overlapping Slurm jobs) swept each other's
    # temporaries mid-write.
    with sole_writer(out_dir / EXPORT_LOCK, "kdsb export", "use another OUT_DIR", remove=True):
        for patient_id in tqdm(wanted, desc="export", unit="patient", disable=None):
            own_heatmaps = heatmaps_dir
            if heatmaps_dir is not None and not heatmap_path(heatmaps_dir, patient_id).exists():
                without_heatmap.append(patient_id)
                own_heatmaps = None
            try:
                # Without a heatmap in DIR an earlier export's is another explain run's (found
                # in review: kept beside this run's heatmaps of the others).
                export_patient(available[patient_id], out_dir, patient_id, own_heatmaps,
                               drop_heatmap=heatmaps_dir is not None)
            except KdsbError as error:
                failed[patient_id] = one_line(error)
                continue
            exported.append(patient_id)
    if without_heatmap:
        logger.warning("--heatmaps %s holds no heatmap of %d of the %d patient(s): %s; their HU "
                       "and lung mask are exported without one (and without an earlier "
                       "export's)", heatmaps_dir,
                       len(without_heatmap), len(wanted), summarise_ids(without_heatmap))
    return exported, failed
