"""Preprocessing on a Dask distributed cluster (`kdsb preprocess ... --scheduler ADDRESS`).

The same per-patient work as the local process pool (`kdsb.preprocessing.workers`), submitted as
one Dask task per patient to a running scheduler whose workers see the same paths (a shared
file system). Results come back as they finish, so the manifest, resume, QC and exit codes are
those of a local run. A patient's volume file is written atomically by the worker, so a worker
that dies mid-patient leaves no partial file; Dask reschedules the patient on another worker
(up to the scheduler's `distributed.scheduler.allowed-failures`, 3 by default), kdsb once more
alone (every task the dying worker held was struck with it), and then reports it as failed,
with a reason. The warnings a patient's task logs on its worker are logged again by the run. A
cluster left without any worker for `NO_WORKERS_S` ends the run.

Start a cluster with `dask scheduler` and `dask worker tcp://HOST:8786` on machines sharing the
data, or from Python with dask-jobqueue (Slurm, PBS, SGE) or dask-kubernetes; README shows how.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from kdsb.errors import KdsbError, UsageError, one_line

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30
# A cluster left without a worker this long ends the run (a job's walltime ended, nodes gone):
# Dask would wait for workers forever, the progress bar frozen.
NO_WORKERS_S = 300
POLL_S = 1.0  # seconds between looks at finished patients and at the workers
INSTALL_HINT = "pip install 'kdsb[cluster]'"


def check_scheduler(scheduler: str) -> None:
    """Refuse what `run_on_dask` cannot use, before any work (`run_cohort` calls it before it
    writes OUT_DIR): distributed not installed, or an address Dask cannot parse
    (`tcp://HOST:PORT`, or `HOST:PORT`; a malformed one was a traceback, then a minute's hang).

    A `tcp://` scheduler must also accept a connection (found by a user's trial: a refused
    one waited `CONNECT_TIMEOUT_S` for Dask's client, after OUT_DIR's lock and manifest had
    been written).

    Raises:
        UsageError: no distributed; an empty address, an unknown scheme, no or a non-numeric
            port; nothing listening at a tcp:// address.
    """
    try:
        from distributed.comm.addressing import get_address_host_port, parse_address
    except ImportError as error:
        raise UsageError(f"expected dask.distributed for --scheduler, received none: "
                         f"{INSTALL_HINT}") from error
    from distributed.comm.registry import get_backend

    address = scheduler if "://" in scheduler else f"tcp://{scheduler}"
    try:
        if not scheduler.strip():
            raise ValueError("empty")
        get_backend(parse_address(address, strict=True)[0])
        get_address_host_port(address)
    except ValueError as error:
        raise UsageError(f"expected --scheduler tcp://HOST:PORT (a running Dask scheduler), "
                         f"received {scheduler!r} ({error})") from None
    if parse_address(address)[0] == "tcp":
        try:
            socket.create_connection(get_address_host_port(address),
                                     timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise UsageError(f"expected a Dask scheduler at {scheduler}, received no answer "
                             f"({one_line(error)})") from None


def run_on_dask(
    worker: Callable[..., object], tasks: dict[str, tuple], scheduler: str
) -> Iterable[tuple[str, object]]:
    """Run `worker(*task)` for every task on the Dask cluster at `scheduler`; yields (id,
    result) as they end, and (id, None) for a patient whose workers kept dying (the caller
    fails it, and says so once: found in review, it was logged here as well).

    Raises:
        UsageError: distributed is not installed, a malformed address, or no scheduler answers
            at `scheduler`.
    """
    check_scheduler(scheduler)
    from distributed import Client
    from distributed.scheduler import KilledWorker

    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise UsageError(f"expected a Dask scheduler at {scheduler}, received no answer "
                         f"({one_line(error)})") from error
    except (TypeError, ValueError) as error:  # e.g. tls:// without distributed's security
        raise UsageError(f"expected a Dask scheduler address kdsb can connect to, received "
                         f"{scheduler!r} ({one_line(error)})") from error
    with client, _client_errors_said_once():
        # `nthreads` lists every worker (`scheduler_info` listed at most 5 in some releases).
        workers = len(client.nthreads())
        logger.info("Dask cluster %s: %d worker(s)", scheduler, workers)
        if not workers:  # found by a user's trial: a silent wait
            logger.warning("the Dask cluster at %s has no worker yet: waiting up to %g s for "
                           "one", scheduler, NO_WORKERS_S)
        # Task keys name the patient and this run: runs sharing a scheduler (say 1 mm and 2 mm
        # volumes of one cohort) must not be handed each other's results.
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(keeping_warnings, worker, *task, pure=False,
                                 key=f"kdsb-preprocess-{pid}-{run}"): pid
                   for pid, task in tasks.items()}
        killed = []
        for patient_id, result in _results(client, futures, scheduler, KilledWorker):
            if result is _KILLED:
                killed.append(patient_id)
            else:
                yield patient_id, result
        # Dask strikes every task a dying worker held, queued ones too: a patient that crashes
        # its worker failed its neighbours with it (found in review). Each is tried once more
        # alone, one at a time (the cluster otherwise idle: such deaths are rare, and a patient
        # that kills its workers must not strike another again); killed again, it is at fault.
        for patient_id in killed:
            future = client.submit(keeping_warnings, worker, *tasks[patient_id], pure=False,
                                   key=f"kdsb-preprocess-{patient_id}-{run}-alone")
            for _, result in _results(client, {future: patient_id}, scheduler, KilledWorker):
                yield patient_id, None if result is _KILLED else result


@contextmanager
def _client_errors_said_once() -> Iterator[None]:
    """Quiet distributed's client logger for a run, unless -v: it logs a lost scheduler as an
    ERROR with 30 lines of traceback, which the run then says in one line (`_results`; found
    by a user's trial)."""
    client_log = logging.getLogger("distributed.client")
    before = client_log.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        client_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        client_log.setLevel(before)


_KILLED = object()  # a task Dask gave up on: its workers kept dying


class _ThreadWarnings(logging.Handler):
    """The warnings (and worse) one thread logs, formatted."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        try:
            self.messages.append(f"{record.name}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - a malformed log call fails no patient
            self.handleError(record)


def keeping_warnings(worker: Callable[..., object], *task) -> tuple[object, list[str]]:
    """`worker(*task)` on a Dask worker, with the warnings it logged meanwhile: the worker's
    logs are the cluster's (a Slurm job's output), not the user's terminal, so the run logs
    them again (found in review: a series-selection tie, skipped files, never seen)."""
    root = logging.getLogger()  # at WARNING in a Dask worker, as Python leaves it
    if not root.handlers:
        # The worker's own log printed warnings through Python's last resort, which any
        # handler (this one's) turns off: one of its own first (found in review).
        root.addHandler(logging.StreamHandler())
    handler = _ThreadWarnings()
    root.addHandler(handler)
    try:
        return worker(*task), handler.messages
    finally:
        root.removeHandler(handler)


def _results(client, futures, scheduler: str, killed_type: type):
    """(patient id, result) of `futures` as they finish; `_KILLED` for one Dask gave up on.
    The warnings each patient's task logged on its worker are logged here again.

    Raises:
        KdsbError: the cluster failed otherwise (the worker itself never raises).
    """
    for future in _as_finished(client, futures, scheduler):
        patient_id = futures[future]
        try:
            result, warnings = future.result()
            for message in warnings:
                logger.warning("%s (on the cluster): %s", patient_id, message)
            yield patient_id, result
        except killed_type:
            yield patient_id, _KILLED
        except Exception as error:  # noqa: BLE001 - the worker never raises: the cluster did
            # The cluster's failure, not the patient's: the message leads with the cluster
            # (found by a user's trial: "patient p2: …" read as p2's fault).
            raise KdsbError(
                f"expected the Dask cluster at {scheduler} to run the patients, received "
                f"{type(error).__name__}: {one_line(error)} while waiting for {patient_id} "
                "(the patients finished so far are kept; rerun to resume)"
            ) from error


def _as_finished(client, futures, scheduler: str):
    """`futures` as they finish (`distributed.as_completed`), watching the workers meanwhile.

    Raises:
        KdsbError: the cluster has had no worker for `NO_WORKERS_S`, or its scheduler is lost.
    """
    from distributed import as_completed

    finished = as_completed(futures, loop=client.loop)
    alone_since = None
    while not finished.is_empty():
        batch = finished.next_batch(block=False)
        if batch:
            alone_since = None
            yield from batch
            continue
        try:
            workers = len(client.nthreads())
        except Exception as error:  # noqa: BLE001 - the scheduler is gone, whatever the type
            raise KdsbError(f"expected the Dask scheduler at {scheduler} to answer, received "
                            f"{type(error).__name__}: {one_line(error)} (the "
                            "patients finished so far are kept; rerun to resume)") from error
        if workers:
            alone_since = None
        elif alone_since is None:
            alone_since = time.monotonic()
        elif time.monotonic() - alone_since > NO_WORKERS_S:
            raise KdsbError(f"expected Dask workers at {scheduler}, received none for "
                            f"{NO_WORKERS_S:g} s (the patients finished so far are kept; rerun "
                            "to resume once workers are back)")
        time.sleep(POLL_S)
