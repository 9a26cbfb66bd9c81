"""The parallel, resumable cohort runner behind `kdsb preprocess`.

`run_cohort` runs `kdsb.preprocessing.pipeline.preprocess_patient` for every patient of an input
root (`find_patients`: each sub-folder and each volume file is one patient) in a process pool,
writes `manifest.csv` as results arrive, skips patients already written (so a killed run
resumes), turns every per-patient failure, worker crash included, into a manifest row with a
one-line reason, and optionally writes QC images (`kdsb.preprocessing.qc`).
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdsb.errors import KdsbError, StoreError, UsageError
from kdsb.io import volumes
from kdsb.io.atomic import atomic_path, remove_stale_temporaries, sole_writer
from kdsb.io.folders import source_stamp
from kdsb.io.tables import summarise_ids
from kdsb.preprocessing.pipeline import (
    DEFAULT_MARGIN_MM,
    DEFAULT_SPACING_MM,
    MARGIN_ATTR,
    SOURCE_STAMP_ATTR,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    PatientResult,
    preprocess_patient,
    usable_cores,
    validate_margin,
)

logger = logging.getLogger(__name__)

SETTINGS_RTOL = 1e-6  # relative tolerance when comparing a stored spacing or margin, mm
MANIFEST_NAME = "manifest.csv"
LOCK_NAME = ".kdsb-preprocess.lock"  # held by the run writing OUT_DIR
# Files in INPUT_ROOT that look like a patient's scan in a format kdsb does not read: Analyze,
# compressed NIfTI other than gzip, archives, arrays (found in review: dropped without a word).
UNREAD_IMAGE_SUFFIXES = (".img", ".hdr", ".nii.bz2", ".nii.xz", ".zip", ".tar", ".tgz",
                         ".tar.gz", ".7z", ".npy", ".npz", ".mgz", ".mnc")
MANIFEST_FIELDS = ("id", "status", "seconds", "shape", "error")
EXIT_OK, EXIT_SOME_FAILED = 0, 1
# Workers live for the whole run. Replacing them every few patients (max_tasks_per_child)
# deadlocks ProcessPoolExecutor on Python < 3.12 (CPython gh-115634) once the first workers
# retire, and buys little: NumPy's large volumes are mmap-allocated and go back to the system
# when freed, so a worker's memory does not grow over a cohort.
WORKER_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
WORKER_DIED_MESSAGE = (
    "the worker process died while preprocessing this scan (killed, or out of memory?)"
)


def worker_died(patient_id: str) -> PatientResult:
    """The failure of a patient whose worker process died, named on its one line (found in
    review: the bare message named no patient)."""
    return PatientResult(patient_id, STATUS_FAILED, error=f"{patient_id}: {WORKER_DIED_MESSAGE}")


def _died(result: PatientResult) -> bool:
    return (result.error or "").endswith(WORKER_DIED_MESSAGE)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _preprocess_safely(
    source: Path,
    out_dir: Path,
    patient_id: str,
    spacing: tuple[float, ...],
    margin_mm: float,
    threads: int,
) -> PatientResult:
    """Worker entry point: never raises for a bad patient, returns a failed result instead."""
    started = time.perf_counter()
    try:
        return preprocess_patient(
            source, out_dir, patient_id=patient_id, spacing=spacing, margin_mm=margin_mm,
            threads=threads,
        )
    except KdsbError as error:
        message, detail = _one_line(error), ""
    except MemoryError:
        message, detail = "out of memory while preprocessing this scan", traceback.format_exc()
    except Exception as error:  # noqa: BLE001 - any bug must fail one patient, not the cohort
        message = f"unexpected {type(error).__name__}: {_one_line(error)}"
        detail = traceback.format_exc()
    if not message.startswith((f"patient {patient_id}:", f"{patient_id}:")):
        message = f"patient {patient_id}: {message}"
    return PatientResult(
        patient_id, STATUS_FAILED, time.perf_counter() - started, error=message, detail=detail
    )


def _validate_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    values = [spacing] if np.isscalar(spacing) else list(spacing)
    if len(values) not in (1, 3):
        raise UsageError(
            f"expected --spacing as one value or three (z y x) in mm, received {len(values)}: "
            f"{values}"
        )
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"expected positive spacings in mm, received {values}")
    return tuple(float(v) for v in values * (3 // len(values)))


def find_patients(input_root: Path, *outputs: Path | None) -> dict[str, Path]:
    """Patient id → folder or volume file for every patient in `input_root`, sorted by id.

    Each visible entry of `input_root` is one patient: a sub-folder (a DICOM series, or a folder
    holding one volume file), whose name is the id, or a volume file (NIfTI `.nii`/`.nii.gz`,
    MetaImage `.mhd`/`.mha`, NRRD `.nrrd`/`.nhdr`), whose name without that suffix is the id. The
    data file beside a `.mhd` or `.nhdr` header (its `.raw`) is not a patient; other files
    (labels.csv, …) and hidden entries are ignored (a link to a missing path with a warning).
    The run's own output folders (`outputs`: OUT_DIR, the QC folder) are left out when they lie
    inside `input_root`, and so, with a warning, are an earlier run's (a folder holding a
    preprocess lock, a manifest.csv or a QC contact sheet).

    Raises:
        UsageError: `input_root` is missing, not a folder, holds no patient, or holds two
            entries with the same id (`p1/` and `p1.nii.gz`).
    """
    from kdsb.io.dicom import is_dicom_file
    from kdsb.io.images import volume_id

    if not input_root.exists():
        raise UsageError(f"expected an input root folder, received a missing path: {input_root}")
    if not input_root.is_dir():
        raise UsageError(f"expected an input root folder, received a file: {input_root}")
    skip = {Path(folder).resolve() for folder in outputs if folder is not None}
    patients: dict[str, Path] = {}
    loose_dicom = []  # DICOM files lying in input_root itself: never a patient
    unread = []  # images in formats kdsb does not read (Analyze, archives): named, not silent
    for path in sorted(input_root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            # A patient's link whose target moved (or lies on a disk not mounted now): not
            # silently one less, and not failed either: a failed patient's earlier volume would
            # be removed (found in review: links into an unmounted disk would have cost every
            # volume of the cohort).
            logger.warning("%s: ignored %s, a link to a missing path (%s); its earlier volume "
                           "and manifest row, if any, are kept", input_root, path.name,
                           os.readlink(path))
            continue
        if path.is_dir():
            patient_id = path.name if path.resolve() not in skip else None
            if patient_id is not None and _kdsb_output(path):
                # An earlier run's OUT_DIR or QC folder (found in review: it failed as a
                # patient, and its "failed" row stayed in the manifest for good).
                logger.warning("%s: ignored %s, the output of an earlier kdsb preprocess "
                               "(volumes or QC images), not a patient", input_root, path.name)
                patient_id = None
        else:  # volume files only: a .raw beside its .mhd, labels.csv, … give None
            patient_id = volume_id(path)
            if patient_id is None and is_dicom_file(path):
                loose_dicom.append(path.name)
            elif patient_id is None and path.name.lower().endswith(UNREAD_IMAGE_SUFFIXES) \
                    and not _data_file_of_a_header(path):
                unread.append(path.name)
        if patient_id is None:
            continue
        if patient_id in patients:
            raise UsageError(
                f"expected one entry per patient id in {input_root}, received two for "
                f"{patient_id}: {patients[patient_id].name} and {path.name}"
            )
        patients[patient_id] = path
    files = (f"{len(loose_dicom)} DICOM file(s) ({', '.join(loose_dicom[:1])}"
             f"{', …' if len(loose_dicom) > 1 else ''})")
    if not patients:
        raise UsageError(
            f"expected one sub-folder per patient, or one NIfTI, MetaImage or NRRD file per "
            f"patient, in {input_root}, received none"
            + (f"; {files} lie in it: a patient's series is a sub-folder (for one patient, pass "
               f"the folder above it)" if loose_dicom else "")
        )
    if loose_dicom:
        logger.warning("%s: ignored %s beside the patients: a patient's series is a sub-folder",
                       input_root, files)
    if unread:
        logger.warning("%s: ignored %d file(s) in a format kdsb does not read (%s): convert them "
                       "to NIfTI, MetaImage or NRRD, or unpack them", input_root, len(unread),
                       summarise_ids(unread))
    return dict(sorted(patients.items()))


def _data_file_of_a_header(path: Path) -> bool:
    """Whether `path` (`p1.img`) lies beside a MetaImage or NRRD header of its stem, whose data
    file it then is (found in review: warned of as a format kdsb does not read)."""
    stem = path.name.split(".")[0]
    return any((path.parent / f"{stem}{suffix}").is_file() for suffix in (".mhd", ".nhdr"))


def _kdsb_output(folder: Path) -> bool:
    """Whether `folder` is a kdsb preprocess OUT_DIR (its lock or manifest) or QC folder (its
    contact sheet)."""
    from kdsb.preprocessing.qc import CONTACT_SHEET_NAME

    return any((folder / name).is_file() for name in (LOCK_NAME, MANIFEST_NAME,
                                                      CONTACT_SHEET_NAME)) or any(
        folder.glob(f"{Path(CONTACT_SHEET_NAME).stem}_[0-9]*.png"))


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


def _write_manifest(out_dir: Path, rows: dict[str, dict[str, str]]) -> Path:
    """Rewrite the manifest atomically (temporary file, then rename), rows sorted by id."""
    path = out_dir / MANIFEST_NAME
    with atomic_path(path) as temp, temp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for patient_id in sorted(rows):
            writer.writerow({key: rows[patient_id].get(key, "") for key in MANIFEST_FIELDS})
    return path


def _existing_attrs(
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
    if not np.allclose(stored_spacing, spacing, rtol=SETTINGS_RTOL, atol=0.0):
        raise UsageError(
            f"{path} was preprocessed with spacing {list(stored_spacing)} mm; expected "
            f"--overwrite or another OUT_DIR for spacing {list(spacing)} mm"
        )
    stored_margin = attrs.get(MARGIN_ATTR)
    if stored_margin is None or not np.isclose(
        float(stored_margin), margin_mm, rtol=SETTINGS_RTOL, atol=0.0
    ):
        used = "an unrecorded margin" if stored_margin is None else f"margin {stored_margin} mm"
        raise UsageError(
            f"{path} was preprocessed with {used}; expected --overwrite or another OUT_DIR "
            f"for --margin-mm {margin_mm}"
        )
    return attrs


def _remove_outdated(path: Path) -> None:
    """Delete a volume file left by an earlier run of a patient that now failed (--overwrite),
    so that a volume file on disk always means status ok."""
    if path.exists():
        logger.warning("%s: removing the volume file of an earlier run", path.name)
        path.unlink()


def _init_worker(level: int) -> None:
    """Worker initializer: log at the parent's level, as `kdsb.cli.main` does (one line each),
    and leave Ctrl-C to the parent. A terminal's Ctrl-C reaches every process of the group; a
    worker interrupted while it waits for a task dies with a traceback and can leave the pool
    waiting on it for good (seen in 4 of 10 tries), so the parent stops the workers itself
    (`_stop_workers`)."""
    logging.basicConfig(level=level, format=WORKER_LOG_FORMAT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Every process pool this process runs (retries run theirs in threads), so that an interrupted
# run stops all of their workers.
_live_pools: set[ProcessPoolExecutor] = set()
_live_pools_lock = threading.Lock()


def _stop_workers() -> None:
    """Terminate the worker processes of every live pool: an interrupted run does not wait for
    the patients under way. ProcessPoolExecutor has no public way to do so before Python 3.14
    (`terminate_workers`), hence its process table."""
    with _live_pools_lock:
        pools = list(_live_pools)
    for pool in pools:
        for process in list((pool._processes or {}).values()):
            process.terminate()


def _pool_context() -> multiprocessing.context.BaseContext:
    # Never fork: a forked worker inherits the parent's threads and locks (HDF5, BLAS, logging).
    # forkserver starts workers quickly on Linux; spawn everywhere else.
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _run_pool(
    worker: Callable[..., PatientResult],
    tasks: dict[str, tuple],
    workers: int,
) -> Iterable[tuple[str, PatientResult | None]]:
    """Run `worker(*task)` for every task in a process pool; yields (id, result) as they end.

    The result is None for a patient whose worker process died (the pool is then broken and
    every unfinished patient yields None).
    """
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_pool_context(),
        initializer=_init_worker,
        initargs=(logging.getLogger().getEffectiveLevel(),),
    )
    with _live_pools_lock:
        _live_pools.add(pool)
    futures: dict[Future, str] = {}
    try:
        futures = {pool.submit(worker, *task): patient_id for patient_id, task in tasks.items()}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:
                yield futures[future], None
    except BaseException:
        if not all(future.done() for future in futures):  # interrupted, patients under way
            _stop_workers()
        raise
    finally:
        with _live_pools_lock:
            _live_pools.discard(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def _run_tasks(
    tasks: dict[str, tuple],
    workers: int,
    worker: Callable[..., PatientResult] = _preprocess_safely,
    scheduler: str | None = None,
) -> Generator[PatientResult, None, None]:
    """Results of `worker(*task)` for every task; a worker crash fails only its own patient.

    `worker` must be importable by name (it runs in spawned processes) and return a
    PatientResult rather than raise.

    With `scheduler`, the tasks run on that Dask cluster (`kdsb.preprocessing.cluster`), which
    retries a patient whose worker died on other workers before it fails. Locally, when a worker
    dies (killed by the system for memory, a crash in a C library), the whole pool breaks and it
    is unknown which patient was at fault, so each unfinished patient is retried alone in a
    fresh one-worker pool, `workers` of them at a time (so one death early in a large cohort
    does not leave the rest to run one by one); a patient whose worker dies again gets a last
    try with no other patient running, and then fails.
    """
    if scheduler is not None:
        from kdsb.preprocessing.cluster import run_on_dask

        for patient_id, result in run_on_dask(worker, tasks, scheduler, WORKER_DIED_MESSAGE):
            yield result or worker_died(patient_id)
        return
    retry: dict[str, tuple] = {}
    with closing(_run_pool(worker, tasks, workers)) as results:
        for patient_id, result in results:
            if result is None:
                retry[patient_id] = tasks[patient_id]
            else:
                yield result
    if not retry:
        return
    logger.warning("a worker process died; retrying %d patient(s), each in a process of its own "
                   "(%s)", len(retry), summarise_ids(sorted(retry)))
    died_again = []
    with ThreadPoolExecutor(max(1, workers)) as alone:
        futures = {alone.submit(_run_alone, worker, patient_id, task): patient_id
                   for patient_id, task in retry.items()}
        try:
            for future in as_completed(futures):
                result = future.result()
                if _died(result) and workers > 1:
                    died_again.append(futures[future])
                else:
                    yield result
        except BaseException:  # interrupted: the queued retries never start, those under way stop
            for future in futures:  # first: one starting after the stop would be waited for
                future.cancel()
            _stop_workers()
            raise
        finally:
            alone.shutdown(wait=True, cancel_futures=True)
    # Beside other patients it may have run out of memory: a last try with the machine alone.
    for patient_id in died_again:
        yield _run_alone(worker, patient_id, retry[patient_id])


def _run_alone(worker: Callable[..., PatientResult], patient_id: str, task: tuple
               ) -> PatientResult:
    """`worker(*task)` in a one-worker pool of its own; failed if that worker dies too."""
    with closing(_run_pool(worker, {patient_id: task}, 1)) as results:
        for _, result in results:
            if result is not None:
                return result
    return worker_died(patient_id)


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
    from kdsb.commands import require_output_dir

    # Before the work (found in review: a path under a file was an OSError, exit 1; a bad QC
    # folder failed the run at its end).
    require_output_dir(out_dir, "OUT_DIR, a folder for the volumes")
    if qc_dir is not None:
        require_output_dir(qc_dir, "--qc DIR, a folder for the QC images")
    patients = find_patients(input_root, out_dir, Path(qc_dir) if qc_dir is not None else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    with sole_writer(out_dir / LOCK_NAME, "kdsb preprocess", "use another OUT_DIR"):
        return _run_locked(patients, out_dir, target, float(margin_mm), overwrite, workers,
                           qc_dir, scheduler)


def _run_locked(
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
    removed = remove_stale_temporaries(out_dir)  # volumes and the manifest
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run", removed)

    rows = read_manifest(out_dir)
    tasks, results = _plan(patients, out_dir, target, margin_mm, overwrite)
    # Each local worker gets its share of the cores; a Dask worker runs one patient per thread.
    pool_size = min(int(workers), max(1, len(tasks)))
    threads = 1 if scheduler is not None else max(1, usable_cores() // pool_size)
    tasks = {pid: (*task, threads) for pid, task in tasks.items()}
    rows.update({pid: result.manifest_row() for pid, result in results.items()})
    manifest = _write_manifest(out_dir, rows)
    logger.info(
        "preprocessing %d patient(s) %s, %d already done", len(tasks),
        f"on the Dask cluster at {scheduler}" if scheduler else f"with {pool_size} worker(s)",
        len(results),
    )

    if tasks:
        runs = _run_tasks(tasks, pool_size, scheduler=scheduler)
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
                        _remove_outdated(volumes.volume_path(out_dir, result.patient_id))
                    _write_manifest(out_dir, rows)
                    bar.update()
            if scheduler is not None:
                # Every task has ended: what its killed workers were writing can go (found in
                # review: left for the next run). Not on an interruption: the cluster's tasks
                # under way go on writing.
                remove_stale_temporaries(out_dir)
        finally:
            runs.close()  # interrupted: the local workers stop now (`_run_pool`)
            if scheduler is None:
                # Files the stopped workers, or workers that died, were writing.
                remove_stale_temporaries(out_dir)

    if qc_dir is not None:
        _write_qc(results, out_dir, Path(qc_dir))
    return _summarise(results, manifest)


def _plan(
    patients: dict[str, Path],
    out_dir: Path,
    spacing: tuple[float, float, float],
    margin_mm: float,
    overwrite: bool,
) -> tuple[dict[str, tuple], dict[str, PatientResult]]:
    """The worker arguments of every patient to preprocess (all but the threads), and the
    results of those skipped.

    A patient is skipped when its volume file exists with the same settings (unless
    `overwrite`) and was made from the source files as they are now (`source_stamp`; a volume of
    a version before the stamp is kept); one written with other settings raises UsageError
    (`_existing_attrs`), and so, with `overwrite` too, does a volume in `out_dir` of a patient
    not in this run written with other settings (`_check_other_patients`).
    """
    tasks: dict[str, tuple] = {}
    skipped: dict[str, PatientResult] = {}
    _check_other_patients(out_dir, patients, spacing, margin_mm)
    for patient_id, source in patients.items():
        path = volumes.volume_path(out_dir, patient_id)
        attrs = None if overwrite else _existing_attrs(path, spacing, margin_mm)
        stamp = None if attrs is None else attrs.get(SOURCE_STAMP_ATTR)
        if stamp is not None and stamp != (now := source_stamp(source)):
            logger.warning("%s: %s changed since %s was written (%s then, %s now): "
                           "preprocessing it again", patient_id, source, path.name, stamp, now)
            attrs = None
        if attrs is None:
            tasks[patient_id] = (source, out_dir, patient_id, spacing, margin_mm)
        else:
            skipped[patient_id] = PatientResult(patient_id, STATUS_SKIPPED,
                                                shape=tuple(attrs["shape"]))
    return tasks, skipped


def _check_other_patients(out_dir: Path, patients: dict[str, Path],
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
        if not np.allclose(stored, spacing, rtol=SETTINGS_RTOL, atol=0.0) or margin is None \
                or not np.isclose(float(margin), margin_mm, rtol=SETTINGS_RTOL, atol=0.0):
            used = "an unrecorded margin" if margin is None else f"margin {margin} mm"
            raise UsageError(
                f"{path} (a patient not in this INPUT_ROOT) was preprocessed with spacing "
                f"{list(stored)} mm and {used}; expected another OUT_DIR for "
                f"spacing {list(spacing)} mm, margin {margin_mm} mm (--overwrite redoes only "
                f"INPUT_ROOT's patients)"
            )
        return


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
