"""Where a classifier looked: 3D heatmaps per patient (Grad-CAM or occlusion), peaks, overlays.

Both methods work on the network input a model was trained with (`VolumeInput.read`: spacing,
HU normalisation, masking, downscaling) and return a heatmap on the volume file's own grid
(z, y, x), so it overlays the HU volume, its lung mask and, after `kdsb export`, the DICOM.

- **Grad-CAM** (default): the classifier is encoder → spatial pyramid pooling → dense head. The
  encoder's output A (its last convolution, after ReLU; 1/8 of the input per axis) is recorded,
  the head run on it under a gradient tape, and the gradient of the logit (the output layer's
  value before its sigmoid, which never saturates: at p = 1.0 in float32 a gradient through p
  is zero and the map would be empty) with respect to A averaged over space gives one weight
  per channel; the map is ReLU(Σ_c w_c A_c).
  It is drawn on the volume grid by linear interpolation between the cells' centres: cell i
  of an axis of m input voxels is centred on input voxel 8i + offset (`cell_centres`; 4i +
  0–3 for a MIL head's block-2 cells), where the offset (0–7) follows from TensorFlow's "same"
  padding of each stride-2 convolution (odd sizes are padded on both sides, even ones only
  after the data), as `tests/test_explain.py` checks against the encoder's response to a blob.
  One forward and one backward pass per patient and model.
- **Occlusion**: a cube of `occlusion_mm` is set to the masking fill (healthy parenchyma,
  the input's "nothing here") at every step of `stride_mm` over the lung mask's bounding box;
  the map is the drop p(original) - p(occluded), spread over the cube. Costs one forward pass per
  position: minutes per patient on a CPU at 1 mm.

An ensemble's heatmap is the mean of its models' maps, each scaled to a maximum of 1 (Grad-CAM
magnitudes differ between models). The peak is the hottest voxel inside the lung mask.

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, UsageError
from kdsb.io.atomic import save_figure
from kdsb.io.tables import write_table

logger = logging.getLogger(__name__)

METHODS = ("gradcam", "occlusion")
DEFAULT_METHOD = METHODS[0]
PEAKS_NAME = "peaks.csv"
PEAK_FIELDS = ("id", "z", "y", "x", "value")
DEFAULT_OCCLUSION_MM = 24.0
STRIDES_PER_EDGE = 1.5  # default step: the cube edge / 1.5 (16 mm for 24 mm cubes)
# The classifier's output unit (sigmoid), in the SPP and the MIL classifier alike.
OUTPUT_LAYER = "p_cancer"


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


def _split_classifier(model: Any) -> tuple[Any, list[Any], Any]:
    """The encoder sub-model, the layers between it and the output unit (pyramid pooling or MIL
    pooling, dense head) and the output unit `p_cancer` (a calibration after it is monotone,
    so it does not change where the model looks)."""
    from kdsb.errors import ModelError
    from kdsb.models.gmcae import encoder_of

    try:
        encoder = encoder_of(model)
    except ModelError:
        raise ModelError(
            f"expected a classifier with an encoder for Grad-CAM, received '{model.name}' "
            "without one (head nll: its instances are patch likelihoods; a cross-validated "
            "run's own classifier.keras nests its fold models: pass the RUN_DIR); use --method "
            "occlusion"
        ) from None
    output = model.get_layer(OUTPUT_LAYER)
    layers = [layer for layer in model.layers if not layer.name.startswith("volume")]
    return encoder, layers[layers.index(encoder) + 1: layers.index(output)], output


def cell_centres(encoder: Any, extent: int) -> tuple[int, float]:
    """Where the encoder's output cells lie along an axis of `extent` input voxels: (stride,
    offset), cell i centred on input voxel stride · i + offset.

    Each convolution with "same" padding centres output j on input s · j + (k - 1) / 2 - p,
    s its stride, k its kernel and p the padding TensorFlow puts before the data (half the
    total, rounded down); composed over the layers, last to first.
    """
    layers = [layer for layer in encoder.layers if getattr(layer, "strides", None)]
    sizes = []
    for layer in layers:  # each layer's input extent
        sizes.append(extent)
        extent = -(-extent // int(layer.strides[0]))
    stride, offset = 1, 0.0
    for layer, size in zip(reversed(layers), reversed(sizes), strict=True):
        s, k = int(layer.strides[0]), int(layer.kernel_size[0])
        before = max((-(-size // s) - 1) * s + k - size, 0) // 2
        stride, offset = s * stride, s * offset + (k - 1) / 2 - before
    return stride, offset


def gradcam(
    model: Any, x: np.ndarray
) -> tuple[np.ndarray, float, list[tuple[int, float]]]:
    """Grad-CAM of one prepared input.

    Args:
        model: a kdsb classifier (input (batch, z, y, x, 1), output (batch, 1) p(cancer)).
        x: the prepared input, float32 (z, y, x, 1).

    Returns:
        (map on the encoder's output grid (z', y', x'), float32, >= 0; the model's p(cancer);
        per axis, where the map's cells lie on the input (`cell_centres`)).
    """
    import tensorflow as tf

    from kdsb.models.calibration import calibration_of

    encoder, hidden, output = _split_classifier(model)
    features = encoder(x[np.newaxis], training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        out = features
        for layer in hidden:
            out = layer(out, training=False)
        # The output layer's pre-activation: a saturated sigmoid (p = 1.0 in float32) would
        # have no gradient left.
        logit = tf.matmul(tf.cast(out, tf.float32), tf.cast(output.kernel, tf.float32))
        logit = logit[0, 0] + tf.cast(output.bias[0], tf.float32)
    gradient = tape.gradient(logit, features)
    weights = tf.reduce_mean(tf.cast(gradient, tf.float32), axis=(1, 2, 3))  # (1, channels)
    cam = tf.nn.relu(tf.einsum("bzyxc,bc->bzyx", tf.cast(features, tf.float32), weights))
    p = float(tf.sigmoid(logit))
    calibration = calibration_of(model)
    if calibration is not None:
        p = float(calibration.apply(p))
    centres = [cell_centres(encoder, n) for n in x.shape[:3]]
    return cam[0].numpy().astype(np.float32), p, centres


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


def occlusion(
    model: Any, x: np.ndarray, lung: np.ndarray, fill: float, size: Sequence[int],
    stride: Sequence[int],
) -> tuple[np.ndarray, float]:
    """Occlusion sensitivity of one prepared input.

    Args:
        model: a kdsb classifier.
        x: the prepared input, float32 (z, y, x, 1).
        lung: bool (z, y, x) lung mask on the input grid: cubes are placed over its bounding box
            and only where they touch it.
        fill: the normalised value an occluded voxel gets.
        size: edges of the occluding box in input voxels (z, y, x): a cube in mm.
        stride: steps in input voxels (z, y, x).

    Returns:
        (map on the input grid (z, y, x): the mean drop in p over the cubes covering each voxel,
        clipped at 0; the model's p(cancer) for the unoccluded input).
    """
    p0 = float(model(x[np.newaxis], training=False)[0, 0])
    total = np.zeros(x.shape[:3], np.float32)
    count = np.zeros(x.shape[:3], np.float32)
    found = np.argwhere(lung)
    if not len(found):
        return total, p0
    low, high = found.min(axis=0), found.max(axis=0) + 1
    # The last start of each axis lies within `size` of the box's far end, so the cubes
    # cover the whole box.
    starts = [range(int(a), max(int(a) + 1, int(b) - edge + step), step)
              for a, b, edge, step in zip(low, high, size, stride, strict=True)]
    sz, sy, sx = size
    cubes = [np.s_[z:z + sz, y:y + sy, x0:x0 + sx]
             for z in starts[0] for y in starts[1] for x0 in starts[2]]
    cubes = [cube for cube in cubes if lung[cube].any()]
    logger.info("occlusion: %d cubes of %s input voxels, one forward pass each", len(cubes),
                "×".join(map(str, size)))
    # One forward pass a cube: minutes a patient on a CPU, so its own progress bar.
    for cube in tqdm(cubes, desc="occlusion", unit="cube", leave=False, disable=None):
        occluded = x.copy()
        occluded[cube] = fill
        p = float(model(occluded[np.newaxis], training=False)[0, 0])
        total[cube] += p0 - p
        count[cube] += 1
    drop = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return np.maximum(drop, 0.0), p0


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
            (`cell_centres`); None: the map is on the input grid.
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
    for model, volume_input in zip(models, inputs, strict=True):
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
            cam, p = occlusion(model, x, lung, fill, size, stride)
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

    from kdsb.preprocessing.hu import LUNG_WINDOW_HU
    from kdsb.preprocessing.qc.overlays import pixel_aspects

    z, y, x = explanation.peak_index
    hu, lung, heat = volume.hu, volume.lung_mask > 0, explanation.heatmap
    views = [("axial", np.s_[z, :, :]), ("coronal", np.s_[:, y, :]), ("sagittal", np.s_[:, :, x])]
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
        ax.set_title(name)
        ax.set_axis_off()
    where = (f"peak at (z, y, x) = ({', '.join(f'{v:.1f}' for v in explanation.peak_mm)}) mm"
             if all(map(math.isfinite, explanation.peak_mm))
             else "no peak (the heatmap is zero in the lungs); slices through their centre")
    figure.suptitle(f"{explanation.patient_id}: p(cancer) = {explanation.probability:.3f}; "
                    f"{where}")
    figure.tight_layout()
    return save_figure(figure, path)


def checked_occlusion_stride_mm(occlusion_mm: float, stride_mm: float | None) -> float:
    """The occlusion step in mm (None: `occlusion_mm` / `STRIDES_PER_EDGE`), the sizes checked.

    Raises:
        UsageError: a size not finite and positive, or a step wider than the cubes (they would
            leave lung between them that no occlusion covers: a map of 0 there).
    """
    if stride_mm is None:
        stride_mm = occlusion_mm / STRIDES_PER_EDGE
    if not all(math.isfinite(mm) and mm > 0 for mm in (occlusion_mm, stride_mm)):
        raise UsageError(f"expected positive, finite occlusion sizes in mm, received "
                         f"{occlusion_mm} and {stride_mm}")
    if stride_mm > occlusion_mm:
        raise UsageError(f"expected --stride-mm at most --occlusion-mm (cubes that overlap or "
                         f"touch), received {stride_mm} > {occlusion_mm}")
    return stride_mm


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
) -> list[Peak]:
    """Explain every patient (or `ids`), streaming one volume at a time: `OUT_DIR/<id>.h5`
    (heatmap), `OUT_DIR/<id>.png` and, at the end, `OUT_DIR/peaks.csv`; returns the peaks.

    The run is journalled in `OUT_DIR/explain.partial` (`kdsb.io.journal`): a killed run, rerun
    with the same models, options and volumes, explains only the patients it had not finished
    (and those whose heatmap or PNG has gone since). The journal is removed with the run's end.

    Raises: as `kdsb.evaluation.predict.predict_cohort` (the same checks, before any work);
    UsageError where a heatmap would replace a volume file (OUT_DIR = DATA_DIR), occlusion
    sizes not finite and positive, or a step (`stride_mm`; None: `occlusion_mm` /
    `STRIDES_PER_EDGE`) wider than the cubes.
    """
    from kdsb.evaluation.predict import (
        check_volumes,
        load_fingerprinted,
        resolve_ids,
        resolve_model_paths,
    )
    from kdsb.io import volumes
    from kdsb.io.atomic import remove_stale_temporaries
    from kdsb.io.heatmaps import heatmap_path, holds_volume, write_heatmap
    from kdsb.io.journal import SUFFIX, open_journal, volume_stamp
    from kdsb.training.run_layout import model_paths_of_run

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
    for patient_id in order:  # heatmaps are <id>.h5 too: never write one over a volume
        if holds_volume(target := heatmap_path(out_dir, patient_id)):
            raise UsageError(f"expected an OUT_DIR apart from the volumes, received {out_dir}, "
                             f"where {patient_id}'s heatmap would replace the volume {target}")
    loaded, fingerprinted = load_fingerprinted(model_paths)
    inputs, models = zip(*loaded, strict=True)
    check_volumes(loaded, [files[i] for i in order])
    if method == "gradcam":  # before any patient, naming the model file (found in review)
        from kdsb.errors import ModelError

        for path, model in zip(model_paths, models, strict=True):
            try:
                _split_classifier(model)
            except ModelError as error:
                raise ModelError(f"{path}: {error}") from None
    # The paths too: each heatmap file names its models.
    fingerprint = {"command": "explain", "method": method, "models": fingerprinted,
                   "model_paths": [os.fspath(p) for p in model_paths]}
    if method == "occlusion":
        fingerprint |= {"occlusion_mm": occlusion_mm, "stride_mm": stride_mm}
    peaks: list[Peak] = []
    with open_journal(out_dir / f"explain{SUFFIX}", fingerprint, "explain") as journal:
        # Of a killed run's last patient; the files of other commands writing here are theirs.
        ours = {PEAKS_NAME}
        for patient_id in order:
            ours |= {heatmap_path(out_dir, patient_id).name, f"{patient_id}.png"}
        remove_stale_temporaries(out_dir, ours)
        for patient_id in tqdm(order, desc="explain", unit="patient", disable=None):
            stamp = volume_stamp(files[patient_id])
            png = out_dir / f"{patient_id}.png"
            done = journal.result(patient_id, stamp)
            if done is not None and heatmap_path(out_dir, patient_id).is_file() and png.is_file():
                peaks.append(Peak(patient_id, done["probability"], tuple(done["peak_mm"]),
                                  done["value"]))
                continue
            volume = volumes.read_volume(files[patient_id])
            volume.patient_id = patient_id
            found = explain_patient(models, inputs, files[patient_id], volume, method=method,
                                    occlusion_mm=occlusion_mm, stride_mm=stride_mm)
            attrs = {"method": method, "probability": found.probability,
                     "models": [os.fspath(p) for p in model_paths]}
            write_heatmap(heatmap_path(out_dir, patient_id), found.heatmap, volume.spacing,
                          volume.origin, attrs)
            write_png(png, volume, found)
            no_peak = any(math.isnan(c) for c in found.peak_mm)  # peak_index: the lungs' centre
            peak = Peak(patient_id, found.probability, found.peak_mm,
                        0.0 if no_peak else float(found.heatmap[found.peak_index]))
            journal.record(patient_id, stamp, {"probability": peak.probability,
                                               "peak_mm": peak.peak_mm, "value": peak.value})
            peaks.append(peak)
        rows = [[p.patient_id, *(f"{v:.2f}" for v in p.peak_mm), f"{p.value:.4f}"]
                for p in peaks]
        write_table(out_dir / PEAKS_NAME, PEAK_FIELDS, rows)
        journal.finish()
    return peaks
