"""`kdsb preprocess --scheduler`: the same run on a Dask cluster of local worker processes."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest

from kdsb.cli import main
from kdsb.io import volumes
from kdsb.phantoms.cohort import write_cohort
from kdsb.preprocessing import cluster as cluster_module
from kdsb.preprocessing.pipeline import STATUS_OK
from kdsb.preprocessing.workers import WORKER_DIED_MESSAGE, run_tasks
from tests.test_cohort import _crash_or_succeed_slowly, _warn_and_succeed

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")


@pytest.fixture(scope="module")
def scheduler():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as local:
        yield local.scheduler_address


def _manifest(folder):
    with open(folder / "manifest.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_cluster_run_writes_what_a_local_run_writes_and_resumes(tmp_path, scheduler,
                                                                monkeypatch):
    write_cohort(tmp_path / "cohort", patients=3, seed=4, size=80, scale=0.6)
    dicom = str(tmp_path / "cohort" / "dicom")
    assert main(["preprocess", dicom, str(tmp_path / "local"), "--workers", "1"]) == 0
    # Relative paths, as README's example gives them: the workers, started elsewhere, get
    # absolute ones (found in review: volumes were written under the workers' own folder).
    monkeypatch.chdir(tmp_path)
    # A worker killed mid-write leaves its temporary: swept once every task has ended (found in
    # review: only local runs swept theirs).
    from kdsb.preprocessing import cohort

    run_tasks = cohort.run_tasks

    def leaving_a_temporary(*args, **kwargs):
        (tmp_path / "dask" / ".tmp-1-abcd1234-p9.h5").write_bytes(b"cut short")
        yield from run_tasks(*args, **kwargs)

    monkeypatch.setattr(cohort, "run_tasks", leaving_a_temporary)
    assert main(["preprocess", "cohort/dicom", "dask", "--scheduler", scheduler,
                 "--qc", "qc"]) == 0
    assert not list((tmp_path / "dask").glob(".tmp-*"))
    local, remote = _manifest(tmp_path / "local"), _manifest(tmp_path / "dask")
    assert sorted(remote) == sorted(local) and len(remote) == 3
    for pid in local:
        assert remote[pid]["status"] == "ok" and remote[pid]["shape"] == local[pid]["shape"]
        a = volumes.read_volume(volumes.volume_path(tmp_path / "local", pid))
        b = volumes.read_volume(volumes.volume_path(tmp_path / "dask", pid))
        np.testing.assert_array_equal(a.hu, b.hu)
        np.testing.assert_array_equal(a.lung_mask, b.lung_mask)
        assert a.origin == b.origin and a.spacing == b.spacing
        assert (tmp_path / "qc" / f"{pid}.png").is_file()
    assert main(["preprocess", dicom, str(tmp_path / "dask"), "--scheduler", scheduler]) == 0
    assert {r["status"] for r in _manifest(tmp_path / "dask").values()} == {"skipped"}


def test_a_patient_whose_workers_die_fails_alone(caplog):
    """Dask strikes every task a dying worker held (found in review: on a one-worker cluster
    the crashing patient's neighbours failed with it): they are tried again alone."""
    tasks = {pid: (pid,) for pid in ("a", "crash", "b", "c")}
    # Dask gives a task up after its second worker death, not its fourth: every worker restart
    # is a chance for the nanny to hang (seen once under load: no worker for 5 minutes).
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                     dashboard_address=None) as one_worker:
        results = {r.patient_id: r for r in run_tasks(
            tasks, 2, worker=_crash_or_succeed_slowly, scheduler=one_worker.scheduler_address)}
    # Its failure is the cohort's to log, once (found in review: logged here as well).
    assert WORKER_DIED_MESSAGE not in caplog.text
    assert sorted(results) == sorted(tasks)
    # The patient is named on its one line (found in review: the bare message named none).
    assert results["crash"].status == "failed"
    assert results["crash"].error == f"patient crash: {WORKER_DIED_MESSAGE}"
    assert all(results[pid].status == STATUS_OK for pid in tasks if pid != "crash")


def test_a_patients_warnings_on_the_cluster_reach_the_run(scheduler, caplog):
    """Found in review: warnings logged on a Dask worker stayed in the worker's own log."""
    results = list(run_tasks({"p7": ("p7",)}, 1, worker=_warn_and_succeed, scheduler=scheduler))
    assert [r.status for r in results] == [STATUS_OK]
    assert "p7 (on the cluster): kdsb.io.dicom: p7: two series tie; kept the first" in \
        caplog.text


def test_two_runs_on_one_scheduler_keep_their_own_results(scheduler):
    """Runs sharing a scheduler and patient ids (found in review: the second run was handed the
    first run's result, its volume never written)."""
    first = cluster_module.run_on_dask(max, {"p1": (1, 2)}, scheduler)
    assert next(first) == ("p1", 2)  # the first run holds its finished task meanwhile
    second = cluster_module.run_on_dask(max, {"p1": (5, 9)}, scheduler)
    assert list(second) == [("p1", 9)]
    assert list(first) == []


def test_no_scheduler_is_a_usage_error(tmp_path, capsys, monkeypatch):
    write_cohort(tmp_path / "cohort", patients=1, seed=4, size=64, scale=0.5)
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 2)
    code = main(["preprocess", str(tmp_path / "cohort" / "dicom"), str(tmp_path / "out"),
                 "--scheduler", "tcp://127.0.0.1:9"])
    assert code == 2
    assert "expected a Dask scheduler at tcp://127.0.0.1:9, received no answer" in \
        capsys.readouterr().err
    # Refused before OUT_DIR is written, at once (found by a user's trial: 30 s, then a lock
    # and an empty manifest left behind).
    assert not (tmp_path / "out").exists()
    # Malformed addresses, refused before any client (found in review: a traceback, then a
    # minute's hang at exit).
    for address in ("garbage", "tcp://localhost:notaport", "http://x:1", ""):
        code = main(["preprocess", str(tmp_path / "cohort" / "dicom"), str(tmp_path / "new"),
                     "--scheduler", address])
        assert code == 2, address
        assert (f"expected --scheduler tcp://HOST:PORT (a running Dask scheduler), received "
                f"{address!r}") in capsys.readouterr().err
        assert not (tmp_path / "new").exists()  # refused before OUT_DIR was written


def test_the_client_s_own_traceback_is_quieted_for_a_run_unless_verbose():
    """distributed's client logs a lost scheduler as an ERROR with its traceback; the run says
    it in one line (found by a user's trial), so that logger is quiet while it runs."""
    client_log = logging.getLogger("distributed.client")
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.INFO)
        with cluster_module._client_errors_said_once():
            assert not client_log.isEnabledFor(logging.ERROR)
        assert client_log.isEnabledFor(logging.ERROR)
        root.setLevel(logging.DEBUG)  # -v: everything through
        with cluster_module._client_errors_said_once():
            assert client_log.isEnabledFor(logging.ERROR)
    finally:
        root.setLevel(level)


def test_a_cluster_failure_is_one_line_leading_with_the_cluster(monkeypatch):
    """A future the cluster cancelled (its scheduler lost): one line that blames the cluster
    and names the patient awaited (found by a user's trial: "patient p2: …" read as p2's
    fault; this line was untested)."""

    class Cancelled:
        def result(self):
            raise RuntimeError("Future cancelled\nreason: scheduler-connection-lost")

    future = Cancelled()
    monkeypatch.setattr(cluster_module, "_as_finished", lambda client, futures, scheduler:
                        iter(futures))
    with pytest.raises(cluster_module.KdsbError) as raised:
        list(cluster_module._results(None, {future: "p2"}, "tcp://h:1", KeyError))
    assert str(raised.value) == (
        "expected the Dask cluster at tcp://h:1 to run the patients, received RuntimeError: "
        "Future cancelled reason: scheduler-connection-lost while waiting for p2 (the patients "
        "finished so far are kept; rerun to resume)")


def test_a_scheduler_without_workers_is_said_to_wait(tmp_path, caplog, monkeypatch):
    """Found by a user's trial: a scheduler with no worker waited minutes without a word."""
    with distributed.LocalCluster(n_workers=0, processes=True,
                                  dashboard_address=None) as empty:
        monkeypatch.setattr(cluster_module, "NO_WORKERS_S", 0.5)
        with caplog.at_level(logging.WARNING):
            with pytest.raises(cluster_module.KdsbError, match="received none for 0.5 s"):
                list(cluster_module.run_on_dask(_warn_and_succeed, {"p0": ()},
                                                empty.scheduler_address))
    assert (f"the Dask cluster at {empty.scheduler_address} has no worker yet: waiting up to "
            f"0.5 s for one") in caplog.text


def test_workers_given_with_a_scheduler_are_said_to_be_unused(tmp_path, caplog):
    """Found in review: --workers was silently ignored with --scheduler."""
    code = main(["preprocess", str(tmp_path / "missing"), str(tmp_path / "out"), "--workers",
                 "3", "--scheduler", "garbage"])
    assert code == 2
    assert "--workers 3 is not used with --scheduler: the cluster's workers run the patients" \
        in caplog.text


def test_a_cluster_left_without_workers_ends_the_run(monkeypatch):
    """Found in review: with every worker gone (a job's walltime over) the run waited forever,
    its progress bar frozen."""
    import threading
    import time

    from kdsb.errors import KdsbError

    monkeypatch.setattr(cluster_module, "NO_WORKERS_S", 1.0)
    monkeypatch.setattr(cluster_module, "POLL_S", 0.1)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None, scheduler_port=0) as local:
        threading.Timer(1.0, local.scale, [0]).start()
        start = time.monotonic()
        with pytest.raises(KdsbError, match=r"expected Dask workers at .*, received none for 1 s"):
            list(cluster_module.run_on_dask(time.sleep, {"p1": (30,)}, local.scheduler_address))
        assert time.monotonic() - start < 20
