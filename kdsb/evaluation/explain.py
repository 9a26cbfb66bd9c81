"""Where a classifier looked: 3D heatmaps per patient (Grad-CAM or occlusion), peaks, overlays.

Both methods work on the network input a model was trained with (`VolumeInput.read`: spacing,
HU normalisation, masking, downscaling) and return a heatmap on the volume file's own grid
(z, y, x), so it overlays the HU volume, its lung mask and, after `kdsb export`, the DICOM.

- **Grad-CAM** (default; `kdsb.evaluation.gradcam`): the gradient of the logit with respect
  to the encoder's last convolution weighs its channels. One forward and one backward pass per
  patient and model.
- **Occlusion** (`kdsb.evaluation.occlusion`): the drop in p(cancer) when a cube of lung is
  set to healthy parenchyma, cube by cube. One forward pass per position: minutes per patient
  on a CPU at 1 mm.

An ensemble's heatmap is the mean of its models' maps, each scaled to a maximum of 1 (Grad-CAM
magnitudes differ between models). The peak is the hottest voxel inside the lung mask.

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, UsageError, naming_on_out_of_memory, one_line
from kdsb.evaluation.gradcam import gradcam, split_classifier
from kdsb.evaluation.occlusion import (
    DEFAULT_OCCLUSION_MM,
    checked_occlusion_stride_mm,
    occlusion,
)
from kdsb.io.atomic import save_figure
from kdsb.io.tables import write_table

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "occlusion")
DEFAULT_METHOD = METHODS[0]
PEAKS_NAME = "peaks.csv"
PEAK_FIELDS = ("id", "z", "y", "x", "value")
PEAK_MARK_COLOUR = "lime"  # the peak's cross on the PNG, apart from the mask's cyan outline
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # end the run: not one patient's failure


@dataclass(frozen=True)
class Explanation:
    """One patient's heatmap.

    Attributes:
        patient_id: the patient id.
        heatmap: float32 (z, y, x) on the volume file's grid, 0 = no evidence, at most 1 (1 at
            the peak of a single model's map).
        probability: the models' p(cancer) for the patient, as `kdsb predict` computes it
            (sigmoid of their mean logit) before its clip to [0.005, 0.995].
        peak_index: (z, y, x) voxel index of the hottest voxel inside the lung mask (the lungs'
            centre when the heatmap is zero there: no peak).
        peak_mm: its patient coordinates, mm (z, y, x); NaN when there is no peak.
    """

    patient_id: str
    heatmap: np.ndarray
    probability: float
    peak_index: tuple[int, int, int]
    peak_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Peak:
    """What `explain_cohort` keeps of each patient (its heatmap is on disk, so memory does not
    grow with the cohort): id, p(cancer), the peak in patient mm (z, y, x) and its value."""

    patient_id: str
    probability: float
    peak_mm: tuple[float, float, float]
    value: float


def peak_voxel(heatmap: np.ndarray) -> tuple[int, int, int]:
    """The hottest voxel (z, y, x) of a heatmap: of the connected region at its maximum, the
    voxel nearest that region's centre.

    Occlusion maps are flat over blocks of voxels covered by the same cubes (8–24 per axis), and
    Grad-CAM's beyond its outermost cell centres; the first voxel at the maximum (`np.argmax`)
    was the block's low corner, 10–30 mm from the evidence (found in review).
    """
    from scipy import ndimage

    first = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    plateau = heatmap == heatmap[first]
    if np.count_nonzero(plateau) > 1:
        labels, _ = ndimage.label(plateau)
        voxels = np.argwhere(labels == labels[first])
        first = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    return tuple(int(i) for i in first)


def to_volume_grid(
    cam: np.ndarray,
    volume_shape: Sequence[int],
    downscale: int,
    centres: Sequence[tuple[int, float]] | None = None,
) -> np.ndarray:
    """Draw a map on the volume grid, linearly between its cells' centres (constant beyond the
    first and last).

    Args:
        cam: the map (z', y', x').
        volume_shape: the volume's shape (z, y, x); the input is the volume cropped to a
            multiple of `downscale` per axis (`VolumeInput.read`): voxels beyond get 0.
        downscale: volume voxels per input voxel along each axis.
        centres: per axis (stride, offset): cell i centred on input voxel stride · i + offset
            (`gradcam.cell_centres`); None: the map is on the input grid.
    """
    centres = centres or [(1, 0.0)] * 3
    heatmap = np.asarray(cam, np.float32)
    # Axis by axis (a small weight matrix each), rather than coordinates for every voxel.
    for axis, (n, (stride, offset)) in enumerate(zip(volume_shape, centres, strict=True)):
        rows = np.arange(n - n % downscale)  # the voxels the input covers; the rest stay 0
        position = (rows + 0.5) / downscale - 0.5  # on the input grid
        cell = np.clip((position - offset) / stride, 0, cam.shape[axis] - 1)
        low = np.floor(cell).astype(int)
        high = np.minimum(low + 1, cam.shape[axis] - 1)
        weights = np.zeros((n, cam.shape[axis]), np.float32)
        np.add.at(weights, (rows, low), 1 - (cell - low))
        np.add.at(weights, (rows, high), cell - low)
        heatmap = np.moveaxis(np.tensordot(weights, heatmap, axes=(1, axis)), 0, axis)
    return heatmap


def explain_patient(
    models: Sequence[Any],
    inputs: Sequence[Any],
    volume_file: str | os.PathLike,
    volume: Any,
    *,
    method: str = DEFAULT_METHOD,
    occlusion_mm: float = DEFAULT_OCCLUSION_MM,
    stride_mm: float | None = None,
) -> Explanation:
    """The heatmap of one patient under one or several classifiers (their mean).

    Args:
        models: loaded classifiers.
        inputs: each model's `VolumeInput` (how it reads a volume).
        volume_file: the patient's kdsb volume file.
        volume: the same file read (`kdsb.io.volumes.read_volume`).
        method: "gradcam" or "occlusion".
        occlusion_mm, stride_mm: occlusion cube edge and step, mm (occlusion only;
            `checked_occlusion_stride_mm`).

    Raises:
        StoreError: an unreadable volume file or one the models cannot read (spacing).
        UsageError: an unknown method, or bad occlusion sizes (`checked_occlusion_stride_mm`).
    """
    from kdsb.data.inputs import block_reduce_cropped
    from kdsb.data.patches import normalize_hu
    from kdsb.evaluation.predict import ensemble_probability

    if method not in METHODS:
        raise UsageError(f"expected --method in {', '.join(METHODS)}, received {method!r}")
    if method == "occlusion":
        stride_mm = checked_occlusion_stride_mm(occlusion_mm, stride_mm)
    patient_id = volume.patient_id
    maps, probabilities = [], []
    prepared: list[tuple[Any, np.ndarray]] = []  # one read a way of reading, as predict does
    for index, (model, volume_input) in enumerate(zip(models, inputs, strict=True)):
        x = next((x for known, x in prepared if known == volume_input), None)
        if x is None:
            x = volume_input.read(volume_file)
            prepared.append((volume_input, x))
        factor = volume_input.downscale
        if method == "gradcam":
            cam, p, centres = gradcam(model, x)
        else:
            centres = None  # the occlusion map is on the input grid
            lung = block_reduce_cropped(volume.lung_mask, factor, np.max) > 0
            # Per axis: volumes of other spacings along z than in-plane get a cube in mm.
            voxel_mm = [s * factor for s in volume.spacing]
            size = [max(1, round(occlusion_mm / v)) for v in voxel_mm]
            stride = [max(1, round(stride_mm / v)) for v in voxel_mm]
            fill = float(normalize_hu(np.float32(volume_input.outside_hu),
                                      clip=volume_input.hu_clip))
            cam, p = occlusion(model, x, lung, fill, size, stride, voxel_mm,
                               models=len(models) if index == 0 else 0)
        if not np.isfinite(cam).all():  # one NaN cell spreads over the whole grid below
            raise KdsbError(f"{volume_file}: expected a finite heatmap, received "
                            f"{int(np.count_nonzero(~np.isfinite(cam)))} non-finite cell(s) of "
                            f"{np.size(cam)} (NaN or inf gradients: a float16 overflow?)")
        heatmap = to_volume_grid(cam, volume.hu.shape, factor, centres)
        top = float(heatmap.max())
        maps.append(heatmap / top if top > 0 else heatmap)
        probabilities.append(p)
    if not all(math.isfinite(p) for p in probabilities):
        raise KdsbError(f"{patient_id}: expected a finite p(cancer), received {probabilities}")
    heatmap = np.mean(maps, axis=0).astype(np.float32)
    lung = volume.lung_mask > 0
    inside = np.where(lung, heatmap, -np.inf) if lung.any() else heatmap
    if inside.max() > 0:
        peak = peak_voxel(inside)
        peak_mm = tuple(float(o + i * s) for o, i, s in
                        zip(volume.origin, peak, volume.spacing, strict=True))
    else:  # no region raised p(cancer): no peak, not the first voxel
        logger.warning("%s: the heatmap is zero throughout the lungs (no region raised "
                       "p(cancer)): no peak", patient_id)
        peak_mm = (math.nan,) * 3
        # The PNG's slices go through the lungs' centre instead.
        from scipy import ndimage

        centre = ndimage.center_of_mass(lung) if lung.any() else np.array(lung.shape) / 2
        peak = tuple(int(round(c)) for c in centre)
    # The ensemble's p(cancer) as `kdsb predict` computes it (without --tta, unclipped).
    probability = ensemble_probability(probabilities)
    return Explanation(patient_id, heatmap, probability, peak, peak_mm)


def write_png(path: str | os.PathLike, volume: Any, explanation: Explanation) -> Path:
    """Three orthogonal slices through the peak: HU (lung window), the heatmap over it, the lung
    mask outlined, the patient's p(cancer) in the title."""
    from matplotlib.figure import Figure

    from kdsb.hu import LUNG_WINDOW_HU
    from kdsb.preprocessing.qc.overlays import pixel_aspects

    z, y, x = explanation.peak_index
    hu, lung, heat = volume.hu, volume.lung_mask > 0, explanation.heatmap
    views = [("axial", np.s_[z, :, :]), ("coronal", np.s_[:, y, :]), ("sagittal", np.s_[:, :, x])]
    # The peak in each view's (column, row) (found by a user's trial: the title named it, the
    # picture did not mark it).
    marks = {"axial": (x, y), "coronal": (x, z), "sagittal": (y, z)}
    peaked = all(map(math.isfinite, explanation.peak_mm))
    aspects = pixel_aspects(volume.spacing)  # mm alike along both axes of a view
    figure = Figure(figsize=(12, 4.4), dpi=100)
    axes = figure.subplots(1, 3)
    for ax, (name, cut) in zip(axes, views, strict=True):
        origin = "upper" if name == "axial" else "lower"
        ax.imshow(hu[cut], cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1],
                  origin=origin, interpolation="nearest", aspect=aspects[name])
        ax.imshow(np.ma.masked_less_equal(heat[cut], 0.05), cmap="inferno", alpha=0.5,
                  vmin=0, vmax=1, origin=origin, interpolation="bilinear", aspect=aspects[name])
        if lung[cut].any() and not lung[cut].all():
            # No `origin`: contour's would flip the data itself (imshow's only turns the axis),
            # and its default puts the outline on the pixels' edges under either (found in
            # review: the axial outline was drawn upside down).
            ax.contour(lung[cut], levels=[0.5], colors="cyan", linewidths=0.6)
        if peaked:
            ax.plot(*marks[name], marker="+", markersize=14, markeredgewidth=1.5,
                    color=PEAK_MARK_COLOUR)
        ax.set_title(name)
        ax.set_axis_off()
    where = (f"peak (+) at (z, y, x) = ({', '.join(f'{v:.1f}' for v in explanation.peak_mm)}) mm"
             if peaked
             else "no peak (the heatmap is zero in the lungs); slices through their centre")
    figure.suptitle(f"{explanation.patient_id}: p(cancer) = {explanation.probability:.3f}; "
                    f"{where}")
    figure.tight_layout()
    return save_figure(figure, path)


def explain_cohort(
    data_dir: str | os.PathLike,
    model_paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    ids: Sequence[str] | None = None,
    ids_source: str = "ids",
    method: str = DEFAULT_METHOD,
    occlusion_mm: float = DEFAULT_OCCLUSION_MM,
    stride_mm: float | None = None,
) -> tuple[list[Peak], dict[str, str]]:
    """Explain every patient (or `ids`), streaming one volume at a time: `OUT_DIR/<id>.h5`
    (heatmap), `OUT_DIR/<id>.png` and, at the end, `OUT_DIR/peaks.csv`.

    The run is journalled in `OUT_DIR/explain.partial` (`kdsb.io.journal`): a killed run, rerun
    with the same models, options and volumes, explains only the patients it had not finished
    (and those whose heatmap or PNG has gone since). A patient that fails (a damaged volume
    file, no finite heatmap) fails alone, an earlier run's heatmap and PNG of it removed: the
    others go on, peaks.csv lists those that worked, and the journal stays, so a rerun works on
    the failed patients only (a full disk ends the run instead). Once every patient
    worked the journal is removed. peaks.csv is removed as a run begins (an earlier run's would
    describe heatmaps this run replaces): a folder without one holds an unfinished run.

    Returns:
        (the peaks of the patients explained, {id: one-line reason} for those that failed).

    Raises: as `kdsb.evaluation.predict.predict_cohort` (the same checks, before any work);
    UsageError where a heatmap would replace a volume file (OUT_DIR = DATA_DIR), occlusion
    sizes not finite and positive, or a step (`stride_mm`; None: `occlusion_mm` /
    `occlusion.STRIDES_PER_EDGE`) wider than the cubes.
    """
    from kdsb.evaluation.predict import check_volumes, load_fingerprinted, resolve_model_paths
    from kdsb.io.atomic import remove_stale_temporaries
    from kdsb.io.heatmaps import heatmap_path, holds_volume
    from kdsb.io.journal import SUFFIX, open_journal, volume_stamp
    from kdsb.io.run_layout import model_paths_of_run
    from kdsb.io.volumes import resolve_ids

    model_paths = resolve_model_paths(model_paths)
    if method not in METHODS:
        raise UsageError(f"expected --method in {', '.join(METHODS)}, received {method!r}")
    if method == "occlusion":  # Grad-CAM reads neither size
        stride_mm = checked_occlusion_stride_mm(occlusion_mm, stride_mm)
    order, files = resolve_ids(Path(data_dir), ids, ids_source)
    out_dir = Path(out_dir)
    if model_paths_of_run(out_dir):  # `explain DATA runA runB`: OUT_DIR left out
        raise UsageError(f"expected an OUT_DIR for the heatmaps, received {out_dir}, the run "
                         "folder of a trained classifier (was OUT_DIR left out?)")
    # Heatmaps are <id>.h5 too: never write one over a volume (a damaged volume is no volume
    # to `holds_volume`: the folders are compared first; found in review).
    if out_dir.exists() and os.path.samefile(out_dir, data_dir):
        raise UsageError(f"expected an OUT_DIR apart from the volumes, received {out_dir}, the "
                         "folder of the volumes itself")
    for patient_id in order:
        target = heatmap_path(out_dir, patient_id)
        if holds_volume(target):
            raise UsageError(f"expected an OUT_DIR apart from the volumes, received {out_dir}, "
                             f"where {patient_id}'s heatmap would replace the volume {target}")
    loaded, fingerprinted = load_fingerprinted(model_paths)
    inputs, models = zip(*loaded, strict=True)
    unreadable: dict[Path, str] = {}  # damaged files: their patients fail alone
    check_volumes(loaded, [files[i] for i in order], unreadable)
    if method == "gradcam":  # before any patient, naming the model file (found in review)
        from kdsb.errors import ModelError

        for path, model in zip(model_paths, models, strict=True):
            try:
                split_classifier(model)
            except ModelError as error:
                raise type(error)(f"{path}: {error}") from None
    # The paths too, absolute, links resolved: each heatmap file names its models (found in
    # review: as typed, a run resumed from another folder was another run, its finished
    # patients redone).
    absolute_paths = [os.path.realpath(p) for p in model_paths]
    fingerprint = {"command": "explain", "method": method, "models": fingerprinted,
                   "model_paths": absolute_paths}
    if method == "occlusion":
        fingerprint |= {"occlusion_mm": occlusion_mm, "stride_mm": stride_mm}
    # Each heatmap names its run by this digest: `export --heatmaps` takes one run's only
    # (`heatmaps.explain_runs`; found in review: a model retrained in place, or other occlusion
    # sizes, wrote heatmaps of the same method and model paths).
    run_digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    peaks: list[Peak] = []
    failed = {i: unreadable[files[i]] for i in order if files[i] in unreadable}
    with open_journal(out_dir / f"explain{SUFFIX}", fingerprint, "explain") as journal:
        # Of a killed run's last patient; the files of other commands writing here are theirs.
        ours = {PEAKS_NAME}
        for patient_id in order:
            ours |= {heatmap_path(out_dir, patient_id).name, f"{patient_id}.png"}
        remove_stale_temporaries(out_dir, ours)
        (out_dir / PEAKS_NAME).unlink(missing_ok=True)  # found in review: it outlived its run
        for patient_id in tqdm(order, desc="explain", unit="patient", disable=None):
            path = files[patient_id]
            if patient_id in failed:
                _remove_outputs(out_dir, patient_id)
                continue
            try:
                stamp = volume_stamp(path)
                png = out_dir / f"{patient_id}.png"
                done = journal.result(patient_id, stamp)
                if done is not None and heatmap_path(out_dir, patient_id).is_file() \
                        and png.is_file():
                    peaks.append(Peak(patient_id, done["probability"], tuple(done["peak_mm"]),
                                      done["value"]))
                    continue
                with naming_on_out_of_memory(str(path)):
                    peak = _explain_into(out_dir, patient_id, path, models, inputs,
                                         absolute_paths, run_digest, method=method,
                                         occlusion_mm=occlusion_mm, stride_mm=stride_mm)
            except (KdsbError, OSError) as error:  # found in review: one file stopped a cohort
                if isinstance(error, OSError) and error.errno in DISK_FULL:
                    raise  # every patient after it would fail alike, each after its work
                reason = one_line(error)
                failed[patient_id] = reason if os.fspath(path) in reason else f"{path}: {reason}"
                _remove_outputs(out_dir, patient_id)
                continue
            journal.record(patient_id, stamp, {"probability": peak.probability,
                                               "peak_mm": peak.peak_mm, "value": peak.value})
            peaks.append(peak)
        rows = [[p.patient_id, *(f"{v:.2f}" for v in p.peak_mm), f"{p.value:.4f}"]
                for p in peaks]
        write_table(out_dir / PEAKS_NAME, PEAK_FIELDS, rows)
        if not failed:
            journal.finish()
    _warn_of_other_runs(out_dir)
    return peaks, failed


def _warn_of_other_runs(out_dir: Path) -> None:
    """Warn where OUT_DIR also holds heatmaps another explain run wrote (of patients this run
    did not explain): `kdsb export --heatmaps` refuses such a folder (found in review: it
    exported both runs' heatmaps side by side)."""
    from kdsb.io.heatmaps import describe_runs, explain_runs
    from kdsb.io.volumes import list_volumes

    runs = explain_runs(sorted(list_volumes(out_dir).items()))
    if len(runs) > 1:
        logger.warning("%s holds heatmaps of %d explain runs: %s; `kdsb export --heatmaps` "
                       "takes one run's: explain into a folder of its own", out_dir, len(runs),
                       describe_runs(runs))


def _remove_outputs(out_dir: Path, patient_id: str) -> None:
    """Remove an earlier run's heatmap and PNG of a patient that failed now: `export
    --heatmaps` would take them for this run's (found in review)."""
    from kdsb.io.heatmaps import heatmap_path

    for path in (heatmap_path(out_dir, patient_id), out_dir / f"{patient_id}.png"):
        path.unlink(missing_ok=True)


def _explain_into(out_dir: Path, patient_id: str, path: Path, models, inputs,
                  model_paths: Sequence[Path], run_digest: str, **options) -> Peak:
    """Explain one patient: its heatmap file and PNG written into `out_dir`; returns its peak."""
    from kdsb.io import volumes
    from kdsb.io.heatmaps import heatmap_path, write_heatmap

    volume = volumes.read_volume(path)
    volume.patient_id = patient_id
    found = explain_patient(models, inputs, path, volume, **options)
    attrs = {"run": run_digest, "method": options["method"], "probability": found.probability,
             "models": [os.fspath(p) for p in model_paths]}  # `heatmaps.RUN_ATTRS`
    write_heatmap(heatmap_path(out_dir, patient_id), found.heatmap, volume.spacing,
                  volume.origin, attrs)
    write_png(out_dir / f"{patient_id}.png", volume, found)
    no_peak = any(math.isnan(c) for c in found.peak_mm)  # peak_index: the lungs' centre
    return Peak(patient_id, found.probability, found.peak_mm,
                0.0 if no_peak else float(found.heatmap[found.peak_index]))
