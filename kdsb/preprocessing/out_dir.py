"""What OUT_DIR of `kdsb preprocess` records beside its volumes: the manifest (one row per
patient, rewritten atomically), the lock of the run writing it, and the settings its volumes
were written with (a rerun must not mix spacings or margins in one cohort)."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from kdsb._version import __version__
from kdsb.errors import KdsbError, StoreError, UsageError
from kdsb.io import volumes
from kdsb.io.atomic import atomic_path, read_json, write_json
from kdsb.preprocessing.pipeline import MARGIN_ATTR, STATUS_FAILED, source_text

logger = logging.getLogger(__name__)

SETTINGS_RTOL = 1e-6  # relative tolerance when comparing a stored spacing or margin, mm


MANIFEST_NAME = "manifest.csv"


LOCK_NAME = ".kdsb-preprocess.lock"  # held by the run writing OUT_DIR
OVERWRITE_PREFIX = ".kdsb-overwrite-"  # + INPUT_ROOT's digest: an --overwrite run under way


MANIFEST_FIELDS = ("id", "status", "seconds", "shape", "error")


def read_manifest(out_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Rows of `out_dir/manifest.csv` by patient id; empty when there is no manifest."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {row["id"]: row for row in csv.DictReader(f) if row.get("id")}


def failed_patients(out_dir: str | os.PathLike) -> set[str]:
    """Ids that `out_dir/manifest.csv` records as failed (none without a manifest)."""
    return {pid for pid, row in read_manifest(out_dir).items()
            if row.get("status") == STATUS_FAILED}


def write_manifest(out_dir: Path, rows: dict[str, dict[str, str]]) -> Path:
    """Rewrite the manifest atomically (temporary file, then rename), rows sorted by id."""
    path = out_dir / MANIFEST_NAME
    with atomic_path(path) as temp, temp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for patient_id in sorted(rows):
            writer.writerow({key: rows[patient_id].get(key, "") for key in MANIFEST_FIELDS})
    return path


def existing_attrs(
    path: Path, spacing: tuple[float, float, float], margin_mm: float
) -> dict | None:
    """Attributes of a complete volume file already written, None when absent or unreadable.

    Args:
        path: the volume file.
        spacing: the requested target spacing in mm, (z, y, x).
        margin_mm: the requested margin around the lungs, mm.

    Raises:
        UsageError: the file was written with another spacing or margin (a file without the
            margin attribute counts as another margin), so skipping it would mix settings in
            one cohort.
    """
    if not path.is_file():
        return None
    try:
        attrs = volumes.read_attrs(path)
    except StoreError as error:
        logger.warning("%s is unreadable and will be redone: %s", path.name, error)
        return None
    stored_spacing = tuple(float(s) for s in attrs["spacing"])
    if not _same_spacing(stored_spacing, spacing):
        raise UsageError(
            f"{path} was preprocessed with spacing {list(stored_spacing)} mm; expected "
            f"--overwrite or another OUT_DIR for spacing {list(spacing)} mm"
        )
    stored_margin = attrs.get(MARGIN_ATTR)
    if not _same_margin(stored_margin, margin_mm):
        used = "an unrecorded margin" if stored_margin is None else f"margin {stored_margin} mm"
        raise UsageError(
            f"{path} was preprocessed with {used}; expected --overwrite or another OUT_DIR "
            f"for --margin-mm {margin_mm}"
        )
    return attrs


def _same_spacing(stored, spacing) -> bool:
    return bool(np.allclose(stored, spacing, rtol=SETTINGS_RTOL, atol=0.0))


def _same_margin(stored, margin_mm: float) -> bool:
    """A volume without the margin attribute (before kdsb 0.1) counts as another margin."""
    return stored is not None and bool(np.isclose(float(stored), margin_mm,
                                                  rtol=SETTINGS_RTOL, atol=0.0))


def check_other_patients(out_dir: Path, patients: dict[str, Path],
                         spacing: tuple[float, float, float], margin_mm: float) -> None:
    """Refuse an OUT_DIR whose volumes of patients not in this run (another cohort's, or
    patients since removed from INPUT_ROOT) were written with other settings: this run, even
    with --overwrite, would leave the two mixed (found in review). The first readable one is
    checked; each run into OUT_DIR is checked so, so they agree with one another.

    Raises:
        UsageError: naming the file and both settings.
    """
    for patient_id, path in volumes.list_volumes(out_dir).items():
        if patient_id in patients:
            continue
        try:
            attrs = volumes.read_attrs(path)
        except StoreError:
            continue  # not this run's patient: nothing to redo, nothing to tell
        stored = tuple(float(s) for s in attrs["spacing"])
        margin = attrs.get(MARGIN_ATTR)
        if not (_same_spacing(stored, spacing) and _same_margin(margin, margin_mm)):
            used = "an unrecorded margin" if margin is None else f"margin {margin} mm"
            raise UsageError(
                f"{path} (a patient not in this INPUT_ROOT) was preprocessed with spacing "
                f"{list(stored)} mm and {used}; expected another OUT_DIR for "
                f"spacing {list(spacing)} mm, margin {margin_mm} mm (--overwrite redoes only "
                f"INPUT_ROOT's patients)"
            )
        return


def is_own_file(name: str) -> bool:
    """Whether a file of this name in OUT_DIR is one preprocess writes: a volume, the manifest,
    an overwrite marker. Its interrupted runs remove only those temporaries: other commands may
    write beside them (`predict --out OUT_DIR/submission.csv`)."""
    return (name.endswith(volumes.SUFFIX) or name == MANIFEST_NAME
            or name.startswith(OVERWRITE_PREFIX))


def remove_outdated(path: Path) -> None:
    """Delete a volume file left by an earlier run of a patient that now failed (--overwrite),
    so that a volume file on disk always means status ok."""
    if path.exists():
        logger.warning("%s: removing the volume file of an earlier run", path.name)
        path.unlink()


def overwrite_marker(out_dir: Path, input_root: Path) -> Path:
    """The file that says an `--overwrite` run of `input_root` into `out_dir` is under way (one
    per INPUT_ROOT: several cohorts may share OUT_DIR)."""
    digest = hashlib.sha256(os.fsencode(Path(input_root).resolve())).hexdigest()[:16]
    return out_dir / f"{OVERWRITE_PREFIX}{digest}.json"


def overwrite_in_progress(out_dir: Path, input_root: Path, spacing: tuple[float, float, float],
                          margin_mm: float) -> int | None:
    """When the killed `--overwrite` run of `input_root` with these settings (and this kdsb)
    began, for this run to continue it: the modification time (ns) of its marker, so the file
    system's clock, as the volumes' is; None when there is none.

    An `--overwrite` run writes its marker (`begin_overwrite`) once it is planned and removes it
    (`end_overwrite`) once it has worked on every patient. The next run of that INPUT_ROOT with
    the same settings, `--overwrite` or not, continues a killed one: a volume written since it
    began counts as done (`written_since`), an older one is redone (found in review: a killed
    `--overwrite` run began again from its first patient, and a rerun without the flag kept the
    volumes it had not reached). To start it over instead, delete the marker.
    """
    marker = overwrite_marker(out_dir, input_root)
    if not marker.is_file():
        return None
    try:
        saved = read_json(marker)
        same = saved["kdsb"] == __version__ and _same_spacing(saved["spacing"], spacing) \
            and _same_margin(saved["margin_mm"], margin_mm)
        began = marker.stat().st_mtime_ns
    except (OSError, KdsbError, KeyError, TypeError, ValueError):  # damaged: not continued
        return None
    if not same:
        logger.warning("%s: a killed --overwrite run of %s with other settings or another kdsb "
                       "(%s) is not continued by this one; its volumes not yet redone stay as "
                       "they were (delete the file once that is no longer wanted)", marker,
                       input_root, {k: saved.get(k) for k in ("spacing", "margin_mm", "kdsb")})
        return None
    logger.info("continuing the --overwrite run of %s that %s records: volumes written since "
                "it began are kept, older ones redone", input_root, marker)
    return began


def begin_overwrite(out_dir: Path, input_root: Path, spacing: tuple[float, float, float],
                    margin_mm: float) -> None:
    """Write the marker of an `--overwrite` run (`overwrite_in_progress`)."""
    write_json(overwrite_marker(out_dir, input_root),
               {"input_root": source_text(input_root),
                "spacing": list(spacing), "margin_mm": margin_mm, "kdsb": __version__})


def written_since(path: Path, began_ns: float, spacing: tuple[float, float, float],
                  margin_mm: float) -> dict | None:
    """`existing_attrs` of a volume written since `began_ns` (`overwrite_in_progress`; inf: a
    new `--overwrite` run, none) with these settings; None for any other (absent, older, other
    settings, unreadable)."""
    try:
        if path.stat().st_mtime_ns < began_ns:
            return None
        return existing_attrs(path, spacing, margin_mm)
    except (OSError, UsageError):
        return None


def end_overwrite(out_dir: Path, input_root: Path) -> None:
    """The `--overwrite` run of `input_root` has worked on every patient."""
    overwrite_marker(out_dir, input_root).unlink(missing_ok=True)
