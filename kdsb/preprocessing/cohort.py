"""The parallel, resumable cohort runner behind `kdsb preprocess`.

`run_cohort` runs `kdsb.preprocessing.pipeline.preprocess_patient` for every patient of an input
root (`find_patients`: each sub-folder and each volume file is one patient) in a process pool,
writes `manifest.csv` as results arrive, skips patients already written (so a killed run
resumes), turns every per-patient failure, worker crash included, into a manifest row with a
one-line reason, and optionally writes QC images (`kdsb.preprocessing.qc`).

The parts: `kdsb.preprocessing.patients` (who the patients are), `kdsb.preprocessing.out_dir`
(manifest, lock, settings of the volumes already there), `kdsb.preprocessing.workers` (the
process pool).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, UsageError, one_line
from kdsb.io import volumes
from kdsb.io.atomic import remove_stale_temporaries, sole_writer
from kdsb.io.source_stamp import matches, same_files_but_times, source_stamp
from kdsb.io.tables import summarise_ids
from kdsb.preprocessing.out_dir import (
    LOCK_NAME,
    begin_overwrite,
    check_other_patients,
    end_overwrite,
    existing_attrs,
    is_own_file,
    overwrite_in_progress,
    read_manifest,
    remove_outdated,
    write_manifest,
    written_since,
)
from kdsb.preprocessing.patients import find_patients
from kdsb.preprocessing.pipeline import (
    DEFAULT_MARGIN_MM,
    DEFAULT_SPACING_MM,
    SOURCE_ATTR,
    SOURCE_STAMP_ATTR,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    PatientResult,
    source_text,
    usable_cores,
    validate_margin,
)
from kdsb.preprocessing.workers import run_tasks

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_SOME_FAILED = 0, 1
# The target spacings a CT cohort is preprocessed at: finer than any CT's detail would only cost
# memory; coarser leaves lungs a few voxels across.
TARGET_SPACING_RANGE_MM = (0.25, 10.0)


def _validate_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    values = [spacing] if np.isscalar(spacing) else list(spacing)
    if len(values) not in (1, 3):
        raise UsageError(
            f"expected --spacing as one value or three (z y x) in mm, received {len(values)}: "
            f"{values}"
        )
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"expected positive spacings in mm, received {values}")
    low, high = TARGET_SPACING_RANGE_MM
    if not all(low <= v <= high for v in values):  # found in review: 1000 mm wrote 1×1×1 "ok"
        raise UsageError(f"expected --spacing between {low:g} and {high:g} mm, received {values}")
    return tuple(float(v) for v in values * (3 // len(values)))


def run_cohort(
    input_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    spacing: float | Sequence[float] = DEFAULT_SPACING_MM,
    margin_mm: float = DEFAULT_MARGIN_MM,
    overwrite: bool = False,
    qc_dir: str | os.PathLike | None = None,
    scheduler: str | None = None,
) -> int:
    """Preprocess every patient of `input_root` into `out_dir` (DESIGN.md contract).

    Every visible sub-folder (named by the folder) and volume file (named by the file without its
    suffix) of `input_root` is one patient (`find_patients`). Patients whose
    `<id>.h5` already exists are skipped unless `overwrite`; such a file must have been written
    with the same spacing and margin (checked before any work). `out_dir/manifest.csv` is rewritten
    atomically after each patient, keeping rows of patients from earlier runs. A patient that
    fails is logged on one line and recorded in the manifest; the others are still written.

    Args:
        input_root: folder with one sub-folder (DICOM files, or one volume file) or one NIfTI,
            MetaImage or NRRD file per patient.
        out_dir: folder for `<id>.h5` files and `manifest.csv` (created if needed).
        workers: worker processes.
        spacing: target voxel size in mm: one value (isotropic) or three (z, y, x).
        margin_mm: margin around the lung bounding box, mm.
        overwrite: redo patients already written.
        qc_dir: when given, write a QC PNG per patient and a contact sheet there.
        scheduler: the address of a Dask scheduler (`tcp://host:8786`): run the patients on
            its workers (which must see `input_root` and `out_dir` at the same paths) instead
            of `workers` local processes.

    Returns:
        Exit status: 0 when every patient is ok or skipped, 1 when some failed.

    Raises:
        UsageError: bad arguments (missing input root, no patients, bad spacing,
            workers < 1, negative margin, an out_dir or qc_dir that is a file, an out_dir holding
            volumes of another spacing or margin without `overwrite`).
    """
    # Absolute: Dask workers resolve paths against their own folders (a relative OUT_DIR put
    # the volumes there, the manifest here saying "ok").
    input_root, out_dir = Path(input_root).absolute(), Path(out_dir).absolute()
    qc_dir = None if qc_dir is None else Path(qc_dir).absolute()
    target = _validate_spacing(spacing)
    if int(workers) != workers or workers < 1:
        raise UsageError(f"expected --workers of at least 1, received {workers}")
    validate_margin(margin_mm)
    if scheduler is not None:  # before OUT_DIR is touched
        from kdsb.preprocessing.cluster import check_scheduler

        check_scheduler(scheduler)
    from kdsb.io.paths import require_output_dir

    # Before the work (found in review: a path under a file was an OSError, exit 1; a bad QC
    # folder failed the run at its end).
    require_output_dir(out_dir, "OUT_DIR, a folder for the volumes")
    if qc_dir is not None:
        require_output_dir(qc_dir, "--qc DIR, a folder for the QC images")
    patients = find_patients(input_root, out_dir, Path(qc_dir) if qc_dir is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Removed as the run ends (found by a user's trial: README promised no lock file was left,
    # and one stayed after every run; a killed run's empty file locks nothing).
    with sole_writer(out_dir / LOCK_NAME, "kdsb preprocess", "use another OUT_DIR",
                     remove=True):
        return _run_locked(input_root, patients, out_dir, target, float(margin_mm), overwrite,
                           workers, qc_dir, scheduler)


def _run_locked(
    input_root: Path,
    patients: dict[str, Path],
    out_dir: Path,
    target: tuple[float, float, float],
    margin_mm: float,
    overwrite: bool,
    workers: int,
    qc_dir: str | os.PathLike | None,
    scheduler: str | None,
) -> int:
    """`run_cohort` once its arguments are checked and `out_dir` is this run's alone."""
    removed = remove_stale_temporaries(out_dir, is_own_file)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run", removed)

    rows = read_manifest(out_dir)
    began = overwrite_in_progress(out_dir, input_root, target, margin_mm)
    if overwrite and began is None:
        began = math.inf  # a new --overwrite run: no volume is its own yet
    tasks, results = _plan(patients, out_dir, target, margin_mm, began, overwrite)
    if began == math.inf:  # planned, so not refused: say so for a rerun after a kill
        begin_overwrite(out_dir, input_root, target, margin_mm)
    # Each local worker gets its share of the cores; a Dask worker runs one patient per thread.
    pool_size = min(int(workers), max(1, len(tasks)))
    threads = 1 if scheduler is not None else max(1, usable_cores() // pool_size)
    tasks = {pid: (*task, threads) for pid, task in tasks.items()}
    rows.update({pid: result.manifest_row() for pid, result in results.items()})
    manifest = write_manifest(out_dir, rows)
    logger.info(
        "preprocessing %d patient(s) %s, %d already done", len(tasks),
        f"on the Dask cluster at {scheduler}" if scheduler else f"with {pool_size} worker(s)",
        len(results),
    )

    if tasks:
        runs = run_tasks(tasks, pool_size, scheduler=scheduler)
        try:
            with tqdm(total=len(tasks), unit="patient", desc="preprocess", disable=None) as bar:
                for result in runs:
                    results[result.patient_id] = result
                    rows[result.patient_id] = result.manifest_row()
                    if result.status == STATUS_FAILED:
                        logger.error("%s", result.error)
                        if result.detail:
                            logger.debug("%s", result.detail)
                        # Before its row: a kill in between leaves no volume beside "failed".
                        remove_outdated(volumes.volume_path(out_dir, result.patient_id))
                    write_manifest(out_dir, rows)
                    bar.update()
            if scheduler is not None:
                # Every task has ended: what its killed workers were writing can go (found in
                # review: left for the next run). Not on an interruption: the cluster's tasks
                # under way go on writing.
                remove_stale_temporaries(out_dir, is_own_file)
        finally:
            runs.close()  # interrupted: the local workers stop now (`workers.run_tasks`)
            if scheduler is None:
                # Files the stopped workers, or workers that died, were writing.
                remove_stale_temporaries(out_dir, is_own_file)

    if began is not None:  # every patient worked on (a failed one's old volume removed)
        end_overwrite(out_dir, input_root)
    if qc_dir is not None:
        _write_qc(results, out_dir, Path(qc_dir))
    return _summarise(results, manifest)


def _plan(
    patients: dict[str, Path],
    out_dir: Path,
    spacing: tuple[float, float, float],
    margin_mm: float,
    overwrite_began: float | None,
    overwrite: bool = False,
) -> tuple[dict[str, tuple], dict[str, PatientResult]]:
    """The worker arguments of every patient to preprocess (all but the threads), and the
    results of those skipped.

    A patient is skipped when its volume file exists with the same settings (in an
    `--overwrite` run, `overwrite_began` not None: written since it began; inf for a new one)
    and was made from
    the source files as they are now (`source_stamp`; a volume of a version before the stamp is
    kept); outside an `--overwrite` run one written with other settings raises UsageError
    (`existing_attrs`), and so, in one too, does a volume in `out_dir` of a patient not in this
    run written with other settings (`check_other_patients`). A volume made from
    other source files elsewhere (`SOURCE_ATTR`, `_another_source`: another cohort with the
    same ids) raises UsageError too, unless `overwrite` (the flag given): replacing it would swap
    one cohort's images for another's under the same id. Moved sources whose files are
    unchanged are skipped. A patient whose source cannot be stamped now (a folder this user may
    no longer search) keeps its volume, with a warning: it could only fail, and its volume go
    with it.
    """
    tasks: dict[str, tuple] = {}
    skipped: dict[str, PatientResult] = {}
    elsewhere: list[str] = []
    check_other_patients(out_dir, patients, spacing, margin_mm)
    for patient_id, source in patients.items():
        path = volumes.volume_path(out_dir, patient_id)
        attrs = existing_attrs(path, spacing, margin_mm) if overwrite_began is None \
            else written_since(path, overwrite_began, spacing, margin_mm)
        stamp = None if attrs is None else attrs.get(SOURCE_STAMP_ATTR)
        try:
            now = None if stamp is None else source_stamp(source)
            if stamp is not None and matches(stamp, source, now):
                now = stamp  # (an older kdsb's stamp of the same files)
        except (OSError, KdsbError) as error:  # found in review: it ended the whole run
            logger.warning("%s: kept %s, its source cannot be read now (%s)", patient_id,
                           path.name, one_line(error))
            now = stamp
        if stamp is not None and stamp != now:
            if not overwrite and _another_source(attrs.get(SOURCE_ATTR), source, stamp, now):
                elsewhere.append(f"{path.name} (made from {attrs[SOURCE_ATTR]}, here "
                                 f"{source_text(source)})")
                continue
            logger.warning("%s: %s changed since %s was written (%s then, %s now): "
                           "preprocessing it again", patient_id, source, path.name, stamp, now)
            attrs = None
        if attrs is None:
            tasks[patient_id] = (source, out_dir, patient_id, spacing, margin_mm)
        else:
            skipped[patient_id] = PatientResult(patient_id, STATUS_SKIPPED,
                                                shape=tuple(attrs["shape"]))
    if elsewhere:  # found in review: another cohort's volume replaced as "changed since"
        raise UsageError(
            f"expected {out_dir}'s volumes of these ids to be of this INPUT_ROOT's patients, "
            f"received {len(elsewhere)} made from other files elsewhere (another cohort with "
            f"the same ids?): {summarise_ids(elsewhere)}; use another OUT_DIR, or --overwrite "
            "to replace them"
        )
    return tasks, skipped


def _another_source(made_from: str | None, source: Path, stamp: str, now: str) -> bool:
    """Whether a volume's recorded source (`SOURCE_ATTR`) is another patient's than `source`
    (another cohort's of the same id), its files differing (`stamp`, `now`): one that still
    exists and is not `source` spelled otherwise (`..`, a symlinked parent), or one gone whose
    files were other files (their count or bytes; a copy moved that kept them but not their
    times is the same patient: found in review)."""
    if made_from is None or made_from == source_text(source):
        return False
    try:
        if os.path.exists(made_from):
            return not os.path.samefile(made_from, source)
    except OSError:
        return False
    return not same_files_but_times(stamp, now)


def _write_qc(results: dict[str, PatientResult], out_dir: Path, qc_dir: Path) -> None:
    """QC images of every patient not failed, and a contact sheet naming the failures."""
    from kdsb.preprocessing.qc import write_qc

    failed = {r.patient_id: r.error for r in results.values() if r.status == STATUS_FAILED}
    volume_files = {
        pid: volumes.volume_path(out_dir, pid) for pid in sorted(results) if pid not in failed
    }
    sheets = write_qc(volume_files, failed, qc_dir)
    logger.info("QC images in %s (contact sheet %s)", qc_dir, ", ".join(p.name for p in sheets))


def _summarise(results: dict[str, PatientResult], manifest: Path) -> int:
    """Log the counts per status; the exit status: 1 when some patient failed, else 0."""
    counts = {
        status: sum(r.status == status for r in results.values())
        for status in (STATUS_OK, STATUS_SKIPPED, STATUS_FAILED)
    }
    summary = (
        f"preprocess: {counts[STATUS_OK]} ok, {counts[STATUS_SKIPPED]} skipped, "
        f"{counts[STATUS_FAILED]} failed; manifest {manifest}"
    )
    if counts[STATUS_FAILED]:
        logger.warning(summary)
        return EXIT_SOME_FAILED
    logger.info(summary)
    return EXIT_OK


