"""Cohorts of real anatomy: one real base scan, varied, with lesions implanted and their truth.

`write_implant_cohort` (behind `kdsb synth OUT_ROOT --base SCAN`) turns one real CT scan (a DICOM
folder or a NIfTI / MetaImage / NRRD file) into many patients written like the phantom cohorts:

    OUT_ROOT/dicom/<id>/       one DICOM CT series per patient (kdsb.phantoms.dicom_write)
    OUT_ROOT/labels.csv        header `id,cancer`: 1 for a patient with a lesion of radius
                               >= `kdsb.phantoms.nodules.CANCER_RADIUS_MM`, exactly half the
                               patients
    OUT_ROOT/truth/<id>.npz    lung_mask (uint8: the base's lungs plus the lesions),
                               lesion_labels (uint8: 0 none, k the k-th lesion), spacing, origin
    OUT_ROOT/truth/<id>.json   label, lesions (kind, place, centre, radius, volume), nodules (the
                               phantom truth's form), the base file and the variation drawn

Each patient is the base scan varied (`vary_base`): mirrored left-right or not, cropped by a
random margin around the lungs, mildly and smoothly deformed (`ELASTIC_MM` at most along each
axis: about 5 mm at most in all), given extra image noise and resampled to another slice
spacing; then lesions are painted in with `kdsb.phantoms.lesions.implant_lesion`. Cancer
patients get one lesion of the requested kinds, places and radii (radius at least the cancer
radius); every patient gets up to `MAX_SMALL_NODULES` small solid nodules (radius 3–6 mm, below
the cancer radius).

The lesions are ground truth. The lungs around them are not: they are kdsb's own segmentation
of the varied base before any lesion was painted (a healthy scan, where it is reliable); the
lesions are placed in and clipped to its parenchyma (`lesions.lung_parenchyma`: its air with
the vessels, not the tissue the mask takes in beside the lungs). Count on `lesion_labels`, not
on `lung_mask`, to judge a lung mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from kdsb.errors import KdsbError, UsageError
from kdsb.io.atomic import write_json
from kdsb.phantoms.layout import dicom_dir, labels_path, truth_dir
from kdsb.phantoms.lesions import (
    KINDS,
    PLACES,
    Lesion,
    implant_lesion,
    lung_parenchyma,
    surface_places,
)

logger = logging.getLogger(__name__)

BIG_KINDS = tuple(kind for kind in KINDS if kind != "small_solid")
SMALL_RADIUS_MM = (3.0, 6.0)  # small solid nodules of every patient
MAX_SMALL_NODULES = 2
PLACEMENT_TRIES = 5  # places drawn for a lesion that finds no room where first drawn
DEFAULT_RADIUS_MM = (8.0, 35.0)  # the cancer lesion's radius
# The largest cancer lesion: what the lung mask is built to keep (`kdsb.preprocessing.lungs`); a
# far larger one rarely fits a lung and is only refused after every placement try.
MAX_RADIUS_MM = DEFAULT_RADIUS_MM[1]
MIRROR_PROBABILITY = 0.5
CROP_MARGIN_MM = (10.0, 40.0)  # kept around the lungs' bounding box, per side
ELASTIC_MM = 4.0  # largest displacement of the smooth deformation along each axis
ELASTIC_GRID_MM = 50.0  # spacing of its random control points
NOISE_HU = (0.0, 15.0)  # standard deviation of the added image noise
SLICE_SPACINGS_MM = (1.0, 1.25, 1.5, 2.0, 2.5)  # drawn; the base's own spacing if finer is off
PATIENT_PREFIX = "implant"  # ids <prefix>_000, … (synth --id-prefix)


def _cubic_zoom_weights(n_out: int, n_control: int) -> np.ndarray:
    """(n_out, n_control) float32 weights W: `W @ c` is `ndimage.zoom(c, n_out / n_control,
    order=3, grid_mode=True, mode="grid-constant")` of any 1D control grid `c` (cut to n_out)."""
    unit_vectors = np.eye(n_control)
    columns = [ndimage.zoom(e, n_out / n_control, order=3, grid_mode=True, mode="grid-constant")
               for e in unit_vectors]
    return np.stack(columns, axis=1)[:n_out].astype(np.float32)


def _smooth_displacement(
    shape: tuple[int, int, int], spacing: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    """A smooth random displacement field (voxels), one array per axis, each at most
    `ELASTIC_MM` (measured 5.2–5.3 mm at most in all, the axes' maxima rarely coinciding):
    random control points every `ELASTIC_GRID_MM`, interpolated by cubic B-splines.

    The 3D `ndimage.zoom` of the control grid evaluates 64 spline terms at every voxel (~5 s per
    axis for a chest CT). The interpolation is separable, so the same field is the grid
    contracted with one weight matrix per axis (`_cubic_zoom_weights`): ~50× faster, equal to
    within 3e-6 voxels.
    """
    coarse = [max(2, int(np.ceil(n * s / ELASTIC_GRID_MM)) + 1) for n, s in zip(shape, spacing,
                                                                                strict=True)]
    weights = [_cubic_zoom_weights(n, c) for n, c in zip(shape, coarse, strict=True)]
    fields = []
    for axis in range(3):
        control = rng.uniform(-1.0, 1.0, coarse).astype(np.float32)
        field = np.einsum("ai,bj,ck,ijk->abc", *weights, control, optimize=True)
        field *= ELASTIC_MM / spacing[axis] / max(float(np.abs(field).max()), 1e-6)
        fields.append(field)
    return fields


def vary_base(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    lungs: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], dict]:
    """One patient from a base scan: mirror, crop, deform, add noise, resample the slices.

    Args:
        hu: the base scan, int16 HU (z, y, x), canonical orientation.
        spacing: its voxel size (z, y, x), mm.
        origin: patient coordinates of its voxel [0, 0, 0], mm (z, y, x).
        lungs: its lung mask (z, y, x), for the crop.
        rng: the source of every random choice.

    Returns:
        (int16 HU, spacing, origin, a JSON-friendly record of what was drawn).
    """
    from kdsb.preprocessing.resample import resample_volume

    spacing_arr = np.asarray(spacing, dtype=np.float64)
    record: dict = {"mirrored": bool(rng.random() < MIRROR_PROBABILITY)}
    if record["mirrored"]:
        hu, lungs = hu[:, :, ::-1], lungs[:, :, ::-1]
    margins = rng.uniform(*CROP_MARGIN_MM, size=(3, 2)) / spacing_arr[:, None]
    box = []
    for axis in range(3):
        present = np.flatnonzero(lungs.any(axis=tuple(a for a in range(3) if a != axis)))
        low = max(0, int(present[0] - margins[axis, 0]))
        high = min(hu.shape[axis], int(present[-1] + 1 + margins[axis, 1]))
        box.append(slice(low, high))
    hu = np.ascontiguousarray(hu[tuple(box)])
    origin_arr = np.asarray(origin, dtype=np.float64) + [b.start for b in box] * spacing_arr
    record["crop"] = [[b.start, b.stop] for b in box]

    displacement = _smooth_displacement(hu.shape, spacing_arr, rng)
    grid = np.indices(hu.shape, dtype=np.float32)
    for axis in range(3):
        grid[axis] += displacement[axis]
    del displacement
    warped = ndimage.map_coordinates(hu.astype(np.float32), grid, order=1, mode="nearest")
    del grid
    sigma = rng.uniform(*NOISE_HU)
    warped += sigma * rng.standard_normal(warped.shape, dtype=np.float32)
    record["noise_hu"] = round(float(sigma), 2)

    choices = [s for s in SLICE_SPACINGS_MM if s >= spacing_arr[0] - 1e-6] or [spacing_arr[0]]
    slice_mm = float(choices[int(rng.integers(len(choices)))])
    target = (slice_mm, float(spacing_arr[1]), float(spacing_arr[2]))
    warped = resample_volume(warped, tuple(spacing_arr), target)
    record["slice_mm"] = slice_mm
    out = np.clip(np.rint(warped), -1024, 3071).astype(np.int16)
    return out, target, tuple(float(round(o, 4)) for o in origin_arr), record  # type: ignore[return-value]


def _check_choices(name: str, chosen: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise UsageError(
            f"expected --{name} among {', '.join(allowed)}, received {', '.join(chosen) or 'none'}"
        )
    return tuple(chosen)


def implant_patient(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    rng: np.random.Generator,
    *,
    cancer: bool,
    kinds: Sequence[str] = BIG_KINDS,
    places: Sequence[str] = PLACES,
    radius_mm: tuple[float, float] = DEFAULT_RADIUS_MM,
    patient_id: str = "patient",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Lesion]]:
    """Paint one patient's lesions into `hu` (in place).

    A lesion that finds no room at its place (too little lung there, a lesion too small for
    the grid) is drawn again at another place, up to `PLACEMENT_TRIES` places in all (the
    cancer lesion with another radius of `radius_mm` too); a small nodule that finds none is
    left out with a warning.

    Returns:
        (hu, the healthy lung mask, uint8 lesion labels (0 none, k the k-th lesion), the
        lesions). The lesions are placed in the mask's parenchyma (`lung_parenchyma`).

    Raises:
        KdsbError: the cancer lesion found no room at `PLACEMENT_TRIES` places.
    """
    from kdsb.preprocessing.lungs import segment_lungs

    lungs = segment_lungs(hu, spacing, patient_id=patient_id) > 0
    parenchyma = lung_parenchyma(hu, lungs, spacing)
    sites = surface_places(parenchyma, spacing)
    wanted: list[tuple[str, str, float]] = []
    if cancer:
        wanted.append((str(rng.choice(kinds)), str(rng.choice(places)), rng.uniform(*radius_mm)))
    for _ in range(int(rng.integers(0, MAX_SMALL_NODULES + 1))):
        wanted.append(("small_solid", str(rng.choice(places)), rng.uniform(*SMALL_RADIUS_MM)))
    labels = np.zeros(hu.shape, dtype=np.uint8)
    lesions: list[Lesion] = []
    for index, (kind, place, radius) in enumerate(wanted):
        free = parenchyma & (labels == 0)  # lesions never overlap
        for _ in range(PLACEMENT_TRIES):
            try:
                truth, lesion = implant_lesion(
                    hu, spacing, origin, free, kind=kind, place=place,
                    radius_mm=round(radius, 2), rng=rng, sites=sites,
                )
                break
            except KdsbError as error:  # the scan is untouched: another place may have room
                problem = error
                place = str(rng.choice(places))
                if cancer and index == 0:  # the cancer lesion keeps its kind and size range
                    radius = rng.uniform(*radius_mm)
        else:
            if cancer and index == 0:
                raise KdsbError(f"patient {patient_id}: {problem} ({PLACEMENT_TRIES} places "
                                f"tried; a smaller --radius-mm range or other --places may fit "
                                f"this base)") from problem
            logger.warning("patient %s: a %s nodule left out: %s (%d places tried)", patient_id,
                           kind, problem, PLACEMENT_TRIES)
            continue
        lesions.append(lesion)
        labels[truth] = len(lesions)
    return hu, lungs, labels, lesions


def write_implant_cohort(
    out_root: str | os.PathLike,
    base: str | os.PathLike,
    *,
    patients: int,
    seed: int,
    kinds: Sequence[str] = BIG_KINDS,
    places: Sequence[str] = PLACES,
    radius_mm: tuple[float, float] = DEFAULT_RADIUS_MM,
    overwrite: bool = False,
    id_prefix: str = PATIENT_PREFIX,
) -> Path:
    """Write a cohort of one base scan with implanted lesions (see the module docstring).

    Args:
        out_root: the cohort folder (created if needed).
        base: the base scan: a DICOM folder or a NIfTI / MetaImage / NRRD file of a chest CT.
        patients: number of patients (>= 1); exactly `patients // 2` have cancer.
        seed: the random seed; patient `i` depends on (seed, i, base, options) and its label,
            which is shuffled over all `patients` (a larger cohort does not extend a smaller
            one).
        kinds: lesion kinds drawn for the cancer lesion.
        places: lesion places drawn for every lesion.
        radius_mm: (low, high) radius of the cancer lesion, mm (low >= the cancer radius).
        overwrite: replace an existing cohort in out_root instead of refusing.
        id_prefix: patient ids are `<id_prefix>_000`, … (see `cohort.write_cohort`).

    Returns:
        The path of labels.csv.

    Raises:
        UsageError: bad options, a missing base, or out_root already holds a cohort.
        KdsbError: the base cannot be read or holds no lungs (the message names it).
    """
    from kdsb.phantoms.cohort import (
        check_id_prefix,
        check_out_root,
        finish_root,
        new_cohort,
        patient_id,
    )
    from kdsb.phantoms.dicom_write import Acquisition, write_ct_series
    from kdsb.phantoms.nodules import CANCER_RADIUS_MM, Nodule
    from kdsb.preprocessing.lungs import segment_lungs
    from kdsb.preprocessing.pipeline import read_patient

    if patients < 1:
        raise UsageError(f"expected --patients >= 1, received {patients}")
    if seed < 0:
        raise UsageError(f"expected a non-negative --seed, received {seed}")
    check_id_prefix(id_prefix)
    kinds = _check_choices("kinds", kinds, KINDS)
    places = _check_choices("places", places, PLACES)
    low, high = (float(r) for r in radius_mm)
    if not CANCER_RADIUS_MM <= low <= high <= MAX_RADIUS_MM:
        raise UsageError(
            f"expected --radius-mm LOW HIGH with {CANCER_RADIUS_MM:g} <= LOW <= HIGH <= "
            f"{MAX_RADIUS_MM:g}, received {low:g} {high:g}"
        )
    base = Path(base)
    if not base.exists():
        raise UsageError(f"expected a base scan (DICOM folder or volume file), received a "
                         f"missing path: {base}")
    out_root = Path(out_root)
    where, base_at = out_root.resolve(), base.resolve()
    written = (dicom_dir(where), truth_dir(where))  # what synth writes and --overwrite replaces
    if where.is_relative_to(base_at) or base_at == labels_path(where) or any(
            base_at.is_relative_to(folder) for folder in written):
        # Found in review: a DICOM base's series then took in the cohort's own (its next run,
        # a resume too, failed on "CT series of 3 patients"), or --overwrite replaced the base.
        raise UsageError(f"expected OUT_ROOT outside the base scan and the base outside "
                         f"OUT_ROOT's dicom/, truth/ and labels.csv, received {out_root} and "
                         f"{base}")
    check_out_root(out_root, overwrite)  # before the base is read and segmented (seconds)
    series = read_patient(base)
    base_lungs = segment_lungs(series.hu, series.spacing, patient_id=str(base)) > 0
    # The base by content, not only by path: a scan replaced at the same path must not mix two
    # cohorts on resuming.
    base_digest = hashlib.sha256(np.ascontiguousarray(series.hu).tobytes())
    base_digest.update(np.asarray([*series.spacing, *series.origin], np.float64).tobytes())
    options = {"base": str(base.resolve()), "base_sha256": base_digest.hexdigest(),
               "patients": patients, "seed": seed,
               "kinds": list(kinds), "places": list(places), "radius_mm": [low, high],
               **({} if id_prefix == PATIENT_PREFIX else {"id_prefix": id_prefix})}
    with new_cohort(out_root, overwrite, options) as finished:
        sequence = np.random.SeedSequence(seed)
        cancer = np.zeros(patients, bool)
        cancer[: patients // 2] = True
        cancer = np.random.default_rng(sequence).permutation(cancer)
        rows = []
        for index, child in enumerate(tqdm(sequence.spawn(patients), desc="synth", unit="patient",
                                           disable=None)):
            pid = patient_id(index, id_prefix)
            if pid in finished:  # written by the stopped run this one resumes
                rows.append((pid, finished[pid]))
                continue
            rng = np.random.default_rng(child)
            hu, spacing, origin, variation = vary_base(
                series.hu, series.spacing, series.origin, base_lungs, rng
            )
            hu, lungs, labels, lesions = implant_patient(
                hu, spacing, origin, rng, cancer=bool(cancer[index]), kinds=kinds, places=places,
                radius_mm=(low, high), patient_id=pid,
            )
            label = int(any(lesion.radius_mm >= CANCER_RADIUS_MM for lesion in lesions))
            acquisition = Acquisition(seed=int(rng.integers(2**31)))
            write_ct_series(dicom_dir(out_root) / pid, hu, spacing, origin, patient_id=pid,
                            acquisition=acquisition)
            np.savez_compressed(
                truth_dir(out_root) / f"{pid}.npz",
                lung_mask=(lungs | (labels > 0)).astype(np.uint8),
                lesion_labels=labels,
                spacing=np.array(spacing),
                origin=np.array(origin),
            )
            record = {
                "id": pid,
                "label": label,
                "base": str(Path(base).resolve()),
                "variation": variation,
                "lesions": [lesion.record() for lesion in lesions],
                "nodules": [
                    vars(Nodule(lesion.center_mm, lesion.radius_mm,
                                lesion.place != "intrapulmonary"))
                    for lesion in lesions
                ],
                "shape": list(hu.shape),
                "spacing": list(spacing),
                "origin": list(origin),
            }
            write_json(truth_dir(out_root) / f"{pid}.json", record)  # last: the patient is written
            rows.append((pid, label))
            logger.debug("%s: %d lesions, label %d", pid, len(lesions), label)
        return finish_root(out_root, rows)


def load_lesion_labels(out_root: str | os.PathLike, patient_id: str) -> tuple[np.ndarray, list]:
    """The lesion labels (uint8, z, y, x, at the written geometry) and lesion records of one
    implanted patient.

    Raises:
        KdsbError: the truth files are missing, or are a phantom cohort's (no lesion labels).
    """
    from kdsb.phantoms.cohort import truth_paths

    arrays_path, record_path = truth_paths(out_root, patient_id)
    with np.load(arrays_path) as arrays:
        if "lesion_labels" not in arrays:  # found in review: a bare KeyError
            raise KdsbError(f"{arrays_path}: expected the truth of a cohort implanted by kdsb "
                            f"synth --base (lesion_labels), received a phantom cohort's")
        labels = arrays["lesion_labels"]
    return labels, json.loads(record_path.read_text())["lesions"]
