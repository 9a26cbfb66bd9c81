"""Running the patients of a cohort in worker processes: a failure (a bad scan, a bug, a worker
killed for memory) fails only its own patient, a dead worker's patients are retried alone, and
an interrupted run stops every worker. On a Dask cluster: `kdsb.preprocessing.cluster`."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from pathlib import Path

from kdsb import interrupts
from kdsb.errors import KdsbError, one_line
from kdsb.io.tables import summarise_ids
from kdsb.preprocessing.pipeline import STATUS_FAILED, PatientResult, preprocess_patient

logger = logging.getLogger(__name__)

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
    return PatientResult(patient_id, STATUS_FAILED,
                         error=f"patient {patient_id}: {WORKER_DIED_MESSAGE}")


def _died(result: PatientResult) -> bool:
    return (result.error or "").endswith(WORKER_DIED_MESSAGE)


def preprocess_safely(
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
        message, detail = one_line(error), ""
    except MemoryError:
        message, detail = "out of memory while preprocessing this scan", traceback.format_exc()
    except Exception as error:  # noqa: BLE001 - any bug must fail one patient, not the cohort
        message = f"unexpected {type(error).__name__}: {one_line(error)}"
        detail = traceback.format_exc()
    if not message.startswith(f"patient {patient_id}:"):  # every line names it so
        message = f"patient {patient_id}: {message.removeprefix(f'{patient_id}: ')}"
    return PatientResult(
        patient_id, STATUS_FAILED, time.perf_counter() - started, error=message, detail=detail
    )


def _init_worker(level: int, parent: int) -> None:
    """Worker initializer: log at the parent's level, as `kdsb.cli.main` does (one line each),
    leave Ctrl-C to the parent, and leave when the parent (process id `parent`) is gone
    (`exit_with`). A terminal's Ctrl-C reaches every process of the group; a worker
    interrupted while it waits for a task dies with a traceback and can leave the pool waiting
    on it for good (seen in 4 of 10 tries), so the parent stops the workers itself
    (`_stop_workers`)."""
    logging.basicConfig(level=level, format=WORKER_LOG_FORMAT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with(parent)


PARENT_CHECK_SECONDS = 0.5


def exit_with(parent: int) -> threading.Thread:
    """Leave this process (`os._exit`, status 1) within `PARENT_CHECK_SECONDS` of process
    `parent`'s end (gone, or dead and not yet reaped by whoever started it), or of this
    process's own parent's (it is then adopted), from a daemon thread. Found by a user's trial:
    after `kill -9` of `kdsb preprocess` its workers (children of the forkserver, not of the
    run, so no parent-death signal reaches them) went on through their queued patients for
    minutes, writing volumes without manifest rows after the run's lock was gone. A volume
    being written is left as a temporary file, which the next run removes."""
    adopted_from = os.getppid()

    def ended() -> bool:
        if os.getppid() != adopted_from:
            return True
        try:
            os.kill(parent, 0)
        except (ProcessLookupError, PermissionError):  # (another user's: the id was reused)
            return True
        return _zombie(parent)

    def watch() -> None:
        while not ended():
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    thread = threading.Thread(target=watch, name="kdsb-exit-with-parent", daemon=True)
    thread.start()
    return thread


# Every process pool this process runs (retries run theirs in threads), so that an interrupted
# run stops all of their workers.
_live_pools: set[ProcessPoolExecutor] = set()


_live_pools_lock = threading.Lock()


def _zombie(pid: int) -> bool:
    """Whether process `pid` has ended but not been reaped (Linux's /proc; elsewhere False):
    a run killed by a program that has not waited for it yet (found in review)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _stop_workers() -> None:
    """Terminate the worker processes of every live pool: an interrupted run does not wait for
    the patients under way. ProcessPoolExecutor has no public way to do so before Python 3.14
    (`terminate_workers`), hence its process table."""
    with _live_pools_lock:
        pools = list(_live_pools)
    for pool in pools:
        for process in list((pool._processes or {}).values()):
            process.terminate()


# A forced stop (a second Ctrl-C while the main thread is stuck) leaves without Python's
# clean-up: the workers, which ignore Ctrl-C, would go on writing.
interrupts.at_forced_stop(_stop_workers)


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
        initargs=(logging.getLogger().getEffectiveLevel(), os.getpid()),
    )
    with _live_pools_lock:
        _live_pools.add(pool)
    futures: dict[Future, str] = {}
    unsubmitted: list[str] = []
    try:
        # One by one inside the try (found in review: a worker dying, or Ctrl-C, while the
        # others were being submitted escaped as a traceback, or left the workers running).
        for patient_id, task in tasks.items():
            try:
                futures[pool.submit(worker, *task)] = patient_id
            except BrokenProcessPool:  # a worker died meanwhile: the rest as its patients
                unsubmitted = list(tasks)[len(futures):]  # submitted in `tasks` order
                break
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:
                yield futures[future], None
        for patient_id in unsubmitted:
            yield patient_id, None
    except BaseException:
        if len(futures) < len(tasks) or not all(future.done() for future in futures):
            _stop_workers()  # interrupted, patients under way (or being submitted)
        raise
    finally:
        with _live_pools_lock:
            _live_pools.discard(pool)
        pool.shutdown(wait=True, cancel_futures=True)


def run_tasks(
    tasks: dict[str, tuple],
    workers: int,
    worker: Callable[..., PatientResult] = preprocess_safely,
    scheduler: str | None = None,
) -> Generator[PatientResult, None, None]:
    """Results of `worker(*task)` for every task; a worker crash fails only its own patient.

    `worker` must be importable by name (it runs in spawned processes) and return a
    PatientResult rather than raise.

    With `scheduler`, the tasks run on that Dask cluster (`kdsb.preprocessing.cluster`), which
    retries a patient whose worker died on other workers, then alone, before it fails. Locally,
    when a worker dies (killed by the system for memory, a crash in a C library), the whole pool
    breaks and it is unknown which patient was at fault, so each unfinished patient is retried
    alone in a fresh one-worker pool, `workers` of them at a time (so one death early in a large
    cohort does not leave the rest to run one by one); a patient whose worker dies again gets a
    last try with no other patient running, and then fails.
    """
    if scheduler is not None:
        from kdsb.preprocessing.cluster import run_on_dask

        for patient_id, result in run_on_dask(worker, tasks, scheduler):
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


