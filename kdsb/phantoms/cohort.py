"""A phantom cohort on disk: DICOM series, labels.csv and the ground truth kept beside them.

Cohort layout (`write_cohort`)::

    OUT_ROOT/dicom/<id>/       one DICOM CT series per patient (kdsb.phantoms.dicom_write)
    OUT_ROOT/labels.csv        header `id,cancer`, exactly half the patients (rounded down) 1
    OUT_ROOT/truth/<id>.npz    lung_mask (uint8, kdsb's canonical (z, y, x) order of the
                               written series, not its stored pixel order), spacing, origin
    OUT_ROOT/truth/<id>.json   label, nodules, geometry and how the series was stored

Each patient's series is stored in one of several styles real scanners use (signed or unsigned
storage, slopes other than 1, declared or undeclared padding, slice orders, flipped axes,
shuffled file names), drawn per patient. Everything is drawn from the seed: the same seed gives
the same cohort, byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Container, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb._version import __version__
from kdsb.errors import KdsbError, UsageError
from kdsb.hu import OUTSIDE_FIELD_HU
from kdsb.io.atomic import TEMP_PREFIX, sole_writer, write_json
from kdsb.io.tables import write_labels
from kdsb.phantoms.anatomy import Phantom, Truth, check_options, make_phantom
from kdsb.phantoms.dicom_write import SLICE_ORDERS, Acquisition, write_ct_series
from kdsb.phantoms.layout import DICOM_DIR, TRUTH_DIR, dicom_dir, labels_path, truth_dir
from kdsb.phantoms.nodules import Nodule

logger = logging.getLogger(__name__)

PATIENT_PREFIX = "phantom"  # ids <prefix>_000, <prefix>_001, … (synth --id-prefix)
ID_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
UNFINISHED_MARKER = ".kdsb-synth-unfinished"  # in OUT_ROOT while synth writes a cohort

# How each patient's series is stored: (storage, intercept) pairs and slopes.
STORAGE_STYLES = (("int16", -1024.0), ("int16", 0.0), ("uint16", -1024.0))
SLOPES = (1.0, 1.0, 1.0, 0.5)
UINT16_PADDING_RAW = 0  # PixelPaddingValue for unsigned storage (chest.HU_MIN keeps it unused)
SHUFFLE_NAMES_PROBABILITY = 0.3
FLIP_PROBABILITY = 0.15


def patient_id(index: int, prefix: str = PATIENT_PREFIX) -> str:
    """The id of patient number `index` (from 0): `phantom_000`, `phantom_001`, …"""
    return f"{prefix}_{index:03d}"


def check_id_prefix(prefix: str) -> None:
    """Raise UsageError for an id prefix that would not make file-name-safe ids."""
    if not ID_PREFIX_PATTERN.fullmatch(prefix):
        raise UsageError(f"expected --id-prefix of letters, digits, '.', '_' and '-' "
                         f"(starting with a letter or digit), received {prefix!r}")


def padding_raw(storage: str, slope: float, intercept: float) -> int:
    """The PixelPaddingValue (raw stored value) for padded pixels of one storage style.

    Args:
        storage: "int16" or "uint16".
        slope: RescaleSlope (> 0).
        intercept: RescaleIntercept in HU.

    Returns:
        uint16: `UINT16_PADDING_RAW` (0). int16: the raw value of `OUTSIDE_FIELD_HU`. Either way
        below the raw value of `kdsb.phantoms.chest.HU_MIN`, so no pixel inside the field of
        view takes it.
    """
    if storage == "uint16":
        return UINT16_PADDING_RAW
    # Under the series' own slope and intercept: a fixed raw value is not safe (raw -2000 with
    # slope 0.5 and intercept 0 is -1000 HU, which real air pixels take).
    return int(round((OUTSIDE_FIELD_HU - intercept) / slope))


def _acquisition(rng: np.random.Generator) -> dict:
    """How one series is stored: the fields of a `dicom_write.Acquisition` that vary, as a dict
    (recorded in the truth JSON)."""
    storage, intercept = STORAGE_STYLES[int(rng.integers(len(STORAGE_STYLES)))]
    # Signed storage: declared padding, or the -2000 HU "outside the field" value undeclared.
    declare_padding = storage == "uint16" or rng.random() < 0.5
    slope = float(SLOPES[int(rng.integers(len(SLOPES)))])
    padding_value = padding_raw(storage, slope, intercept) if declare_padding else None
    return {
        "storage": storage,
        "slope": slope,
        "intercept": intercept,
        "padding_value": padding_value,
        "slice_order": SLICE_ORDERS[int(rng.integers(len(SLICE_ORDERS)))],
        "flip_rows": bool(rng.random() < FLIP_PROBABILITY),
        "flip_columns": bool(rng.random() < FLIP_PROBABILITY),
        "shuffle_names": bool(rng.random() < SHUFFLE_NAMES_PROBABILITY),
        "seed": int(rng.integers(2**31)),
    }


def check_out_root(out_root: Path, overwrite: bool) -> list[Path]:
    """Refuse an OUT_ROOT `new_cohort` would refuse (a cohort there without `overwrite`, files
    synth did not write): callers with slow work before `new_cohort` call it first. Returns
    what of a cohort OUT_ROOT holds (dicom/, truth/, labels.csv).

    Raises:
        UsageError: as `new_cohort` (but for another synth run writing it).
    """
    marker = out_root / UNFINISHED_MARKER
    existing = [dicom_dir(out_root), truth_dir(out_root), labels_path(out_root)]
    existing = [path for path in existing if path.exists()]
    unfinished = marker.is_file() and not labels_path(out_root).exists()
    if existing and not (unfinished or overwrite):
        raise UsageError(
            f"expected a new or empty OUT_ROOT, received {out_root} which already holds "
            f"{', '.join(path.name for path in existing)} (use --overwrite to replace them)"
        )
    synths = marker.is_file() or bool(_synth_records(out_root))
    if existing and overwrite and not synths:
        # Found in review: --overwrite deleted any dicom/ and labels.csv, a real cohort's too.
        raise UsageError(
            f"expected --overwrite of a cohort kdsb synth wrote, received {out_root} whose "
            f"{', '.join(path.name for path in existing)} has no synth truth/ records beside "
            f"it: nothing deleted (choose another OUT_ROOT)"
        )
    return existing


@contextmanager
def new_cohort(out_root: Path, overwrite: bool, options: dict) -> Iterator[dict[str, int]]:
    """Make OUT_ROOT ready for a cohort and hold it while the cohort is written; yields the
    patients already written (id → label) by a stopped run of the same `options`, which the
    caller skips.

    dicom/ and truth/ are created; an old cohort is removed only with `overwrite` (else a
    UsageError), or without it when a synth run that stopped (killed, or failed) left it
    unfinished: its `UNFINISHED_MARKER` and no labels.csv. An unfinished cohort begun with the
    same options (and kdsb version), which the marker holds, is resumed instead: the patients
    whose truth record was written (each patient's last file) are kept, every other patient's
    files removed. The marker is the run's lock (`kdsb.io.atomic.sole_writer`), so a run still
    writing is never taken for a stopped one; it stays until `finish_root` has written
    labels.csv. A dicom/ folder without it is never taken for synth's own.

    Raises:
        UsageError: OUT_ROOT holds a cohort (without `overwrite`), or files synth did not write
            (dicom/ or labels.csv without its truth/ records: never deleted, even with
            `overwrite`), or another synth run is writing it.
    """
    marker = out_root / UNFINISHED_MARKER
    existing = check_out_root(out_root, overwrite)
    unfinished = marker.is_file() and not labels_path(out_root).exists()
    out_root.mkdir(parents=True, exist_ok=True)
    begun = json.dumps({**options, "kdsb": __version__}, sort_keys=True).encode()
    with sole_writer(marker, "kdsb synth", "use another OUT_ROOT") as handle:
        handle.seek(0)
        if existing and unfinished and not overwrite and handle.read() == begun:
            finished = _keep_finished(out_root)
            logger.info("resuming the unfinished cohort a stopped synth run left in %s: %d "
                        "patient(s) written", out_root, len(finished))
            yield finished
            return
        if existing and not overwrite:
            logger.warning("replacing the unfinished cohort a stopped synth run left in %s",
                           out_root)
        handle.truncate(0)  # first: a cohort half deleted is nobody's to resume
        handle.flush()
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        dicom_dir(out_root).mkdir()
        truth_dir(out_root).mkdir()
        handle.write(begun)
        handle.flush()
        yield {}


def _keep_finished(out_root: Path) -> dict[str, int]:
    """The patients of an unfinished cohort whose truth record (written last, atomically) is
    there, id → label; every other patient's files are removed (a series cut short)."""
    for folder in (DICOM_DIR, TRUTH_DIR):
        (out_root / folder).mkdir(exist_ok=True)
    finished = {}
    for record in truth_dir(out_root).glob("*.json"):
        pid = record.stem
        if pid.startswith(TEMP_PREFIX) or not (truth_dir(out_root) / f"{pid}.npz").is_file() \
                or not (dicom_dir(out_root) / pid).is_dir():
            continue
        try:
            finished[pid] = int(json.loads(record.read_text())["label"])
        except (ValueError, KeyError, TypeError):
            continue
    for path in dicom_dir(out_root).iterdir():
        if path.name not in finished:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in truth_dir(out_root).iterdir():
        if path.stem not in finished:  # `stem`: an --id-prefix may hold dots (v1.2_000.json)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return finished


def _synth_records(out_root: Path) -> list[str]:
    """The patients of OUT_ROOT that carry synth's own trio: `truth/<id>.json`,
    `truth/<id>.npz` and `dicom/<id>/`. A real cohort's own `truth/*.json` (annotations) has no
    such trio, so `--overwrite` never takes it for synth's (found in review)."""
    truth = truth_dir(out_root)
    if not truth.is_dir():
        return []
    return [record.stem for record in truth.glob("*.json")
            if (truth / f"{record.stem}.npz").is_file()
            and (dicom_dir(out_root) / record.stem).is_dir()]


def finish_root(out_root: Path, rows: list[tuple[str, int]]) -> Path:
    """Write labels.csv (last and atomically: it marks a complete cohort) and drop the
    unfinished marker (inside `new_cohort`); returns the path of labels.csv."""
    labels_csv = write_labels(labels_path(out_root), rows)
    (out_root / UNFINISHED_MARKER).unlink(missing_ok=True)
    return labels_csv


def _write_truth(truth_dir: Path, pid: str, phantom: Phantom, acquisition: dict) -> None:
    np.savez_compressed(
        truth_dir / f"{pid}.npz",
        lung_mask=phantom.lung_mask,
        spacing=np.array(phantom.spacing),
        origin=np.array(phantom.origin),
    )
    record = {
        "id": pid,
        "label": phantom.label,
        "nodules": [asdict(n) for n in phantom.nodules],
        "shape": list(phantom.hu.shape),
        "spacing": list(phantom.spacing),
        "origin": list(phantom.origin),
        "acquisition": acquisition,
    }
    write_json(truth_dir / f"{pid}.json", record)  # last: the patient is written


def _cohort(
    *, patients: int, seed: int, size: int, scale: float, skip: Container[str] = (),
    prefix: str = PATIENT_PREFIX,
) -> Iterator[tuple[str, Phantom | None, dict | None]]:
    """Each patient of a cohort in turn: its id, phantom and `write_ct_series` storage options
    (None and None for the ids in `skip`, which are not drawn).

    Labels: exactly `patients // 2` cancer cases, shuffled; patient `i` depends only on
    (seed, i, size, scale) and its label.
    """
    sequence = np.random.SeedSequence(seed)
    labels = np.zeros(patients, int)
    labels[: patients // 2] = 1
    labels = np.random.default_rng(sequence).permutation(labels)
    for index, child in enumerate(sequence.spawn(patients)):
        pid = patient_id(index, prefix)
        if pid in skip:
            yield pid, None, None
            continue
        rng = np.random.default_rng(child)
        phantom = make_phantom(rng, size=size, cancer=bool(labels[index]), scale=scale)
        _warn_of_implausible_lungs(pid, phantom, scale)
        yield pid, phantom, _acquisition(rng)


def _warn_of_implausible_lungs(pid: str, phantom: Phantom, scale: float) -> None:
    """Warn of a phantom whose lungs `kdsb preprocess` will refuse as implausible (a total
    volume outside `MIN_LUNG_LITRES`–`MAX_LUNG_LITRES`): a small or large `scale`."""
    from kdsb.preprocessing.lungs.segment import MAX_LUNG_LITRES, MIN_LUNG_LITRES

    litres = float(np.count_nonzero(phantom.lung_mask)) * float(np.prod(phantom.spacing)) / 1e6
    if not MIN_LUNG_LITRES <= litres <= MAX_LUNG_LITRES:
        logger.warning("%s: lungs of %.2f L at --scale %g, outside the %g–%g L kdsb preprocess "
                       "accepts: it will fail there", pid, litres, scale, MIN_LUNG_LITRES,
                       MAX_LUNG_LITRES)


def write_cohort(
    out_root: str | os.PathLike,
    *,
    patients: int,
    seed: int,
    size: int = 128,
    scale: float = 1.0,
    overwrite: bool = False,
    id_prefix: str = PATIENT_PREFIX,
) -> Path:
    """Write a phantom cohort: DICOM series, labels.csv and ground truth (see module docstring).

    Labels: exactly `patients // 2` cancer cases, shuffled over the whole cohort. Patient `i`
    depends only on (seed, i, size, scale) and its label; the labels' shuffle depends on
    `patients`, so a larger cohort does not extend a smaller one (its patients may differ).

    Args:
        out_root: the cohort folder (created if needed).
        patients: number of patients (>= 1).
        seed: the random seed.
        size: axial image side in pixels.
        scale: physical size of each patient relative to an adult (see `make_phantom`).
        overwrite: replace an existing cohort in out_root instead of refusing.
        id_prefix: patient ids are `<id_prefix>_000`, …: another prefix keeps a held-out
            cohort's ids apart from a training cohort's (evaluate refuses ids in both).

    Returns:
        The path of labels.csv.

    Raises:
        UsageError: bad patients, size, scale or prefix, or out_root already holds a cohort.
    """
    if patients < 1:
        raise UsageError(f"expected --patients >= 1, received {patients}")
    if seed < 0:
        raise UsageError(f"expected a non-negative --seed, received {seed}")
    check_options(size, scale)
    check_id_prefix(id_prefix)
    out_root = Path(out_root)
    options = {"patients": patients, "seed": seed, "size": size, "scale": scale,
               **({} if id_prefix == PATIENT_PREFIX else {"id_prefix": id_prefix})}
    with new_cohort(out_root, overwrite, options) as finished:
        rows = []
        cohort = _cohort(patients=patients, seed=seed, size=size, scale=scale, skip=finished,
                         prefix=id_prefix)
        for pid, phantom, acquisition in tqdm(
            cohort, total=patients, desc="synth", unit="patient", disable=None
        ):
            if phantom is None:  # written by the stopped run this one resumes
                rows.append((pid, finished[pid]))
                continue
            write_ct_series(
                dicom_dir(out_root) / pid,
                phantom.hu,
                phantom.spacing,
                phantom.origin,
                patient_id=pid,
                padding_mask=np.broadcast_to(phantom.padding_mask, phantom.hu.shape),
                acquisition=Acquisition(**acquisition),
            )
            _write_truth(truth_dir(out_root), pid, phantom, acquisition)
            rows.append((pid, phantom.label))
            logger.debug("%s: shape %s, label %d", pid, phantom.hu.shape, phantom.label)
        return finish_root(out_root, rows)


def truth_paths(out_root: str | os.PathLike, patient_id: str) -> tuple[Path, Path]:
    """The (`.npz`, `.json`) truth files of one cohort patient, phantom or implanted.

    Raises:
        KdsbError: either file is missing.
    """
    folder = truth_dir(out_root)
    arrays_path, record_path = folder / f"{patient_id}.npz", folder / f"{patient_id}.json"
    if not arrays_path.is_file() or not record_path.is_file():
        raise KdsbError(
            f"expected truth files {arrays_path.name} and {record_path.name} in "
            f"{folder}, received a missing file for patient {patient_id}"
        )
    return arrays_path, record_path


def load_truth(out_root: str | os.PathLike, patient_id: str) -> Truth:
    """Read the ground truth `write_cohort` kept for one patient.

    Args:
        out_root: the cohort folder.
        patient_id: the patient id (for example `phantom_000`).

    Returns:
        Its lung mask (uint8, z, y, x, at the written geometry), spacing and origin (mm, z, y, x),
        nodules and label.

    Raises:
        KdsbError: the truth files are missing.
    """
    arrays_path, record_path = truth_paths(out_root, patient_id)
    record = json.loads(record_path.read_text())
    with np.load(arrays_path) as arrays:
        return Truth(
            lung_mask=arrays["lung_mask"],
            spacing=tuple(float(v) for v in arrays["spacing"]),
            origin=tuple(float(v) for v in arrays["origin"]),
            nodules=[
                Nodule(tuple(n["center_mm"]), n["radius_mm"], n["juxtapleural"])
                for n in record["nodules"]
            ],
            label=int(record["label"]),
        )
