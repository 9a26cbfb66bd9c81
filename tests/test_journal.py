"""Tests of `kdsb.io.journal`: results kept across a kill, and only when they still hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdsb._version import __version__
from kdsb.errors import UsageError
from kdsb.io.journal import file_digest, open_journal, volume_stamp

FINGERPRINT = {"command": "predict", "models": [["abc", {"spacing_mm": (1.0, 1.0, 1.0)}]]}


def test_results_survive_a_reopen_and_hold_only_for_their_stamp(tmp_path):
    path = tmp_path / "sub.csv.partial"
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 0
        journal.record("a", [10, 1], 0.25)
        journal.record("b", [20, 2], {"peak_mm": [1.5, float("nan"), 3.0]})
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 2
        assert journal.result("a", [10, 1]) == 0.25
        assert journal.result("a", [10, 999]) is None  # the volume was written again since
        assert journal.result("c", [10, 1]) is None
        assert journal.result("b", [20, 2])["peak_mm"][0] == 1.5


def test_another_runs_journal_is_discarded(tmp_path):
    path = tmp_path / "explain.partial"
    with open_journal(path, FINGERPRINT, "predict") as journal:
        journal.record("a", [10, 1], 0.25)
    other = {**FINGERPRINT, "models": [["def", {}]]}
    with open_journal(path, other, "predict") as journal:
        assert journal.held == 0 and journal.result("a", [10, 1]) is None
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{**json.loads(json.dumps(other)),
                                                     "kdsb": __version__}]


def test_another_kdsb_versions_journal_is_discarded(tmp_path, monkeypatch):
    from kdsb.io import journal as module

    path = tmp_path / "sub.csv.partial"
    with open_journal(path, FINGERPRINT, "predict") as journal:
        journal.record("a", [10, 1], 0.25)
    monkeypatch.setattr(module, "__version__", "99.0")
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 0


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_file_mended(tmp_path):
    path = tmp_path / "sub.csv.partial"
    with open_journal(path, FINGERPRINT, "predict") as journal:
        journal.record("a", [10, 1], 0.25)
        journal.record("b", [20, 2], 0.5)
    whole = path.read_bytes()
    path.write_bytes(whole[:-7])  # the kill came while "b" was being written
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 1 and journal.result("b", [20, 2]) is None
        journal.record("b", [20, 2], 0.5)
    assert path.read_bytes() == whole


def test_a_second_run_writing_the_same_journal_is_refused(tmp_path):
    path = tmp_path / "sub.csv.partial"
    other_run = ("import sys, time; from kdsb.io.journal import open_journal\n"
                 "with open_journal(sys.argv[1], {}, 'predict'):\n"
                 "    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", other_run, str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match="no other kdsb predict writing"), \
                open_journal(path, {}, "predict"):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_digest_and_stamp_follow_the_files_content(tmp_path):
    first, second = tmp_path / "a.keras", tmp_path / "b.keras"
    first.write_bytes(b"model one")
    second.write_bytes(b"model one")
    assert file_digest(first) == file_digest(second)
    second.write_bytes(b"model two")
    assert file_digest(first) != file_digest(second)
    assert volume_stamp(second)[0] == len(b"model two")
    # A file renamed into place with the size and modification time of the old one (a copy
    # with `cp -p`, a coarse clock) still differs (found in review).
    import os

    before = volume_stamp(second)
    replacement = tmp_path / "new"
    replacement.write_bytes(b"model 2!!")
    stat = second.stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, second)
    assert volume_stamp(second) != before and volume_stamp(second)[:2] == before[:2]


def test_a_header_cut_short_starts_afresh_and_stays_readable(tmp_path):
    path = tmp_path / "sub.csv.partial"
    with open_journal(path, FINGERPRINT, "predict"):
        pass
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # killed before the header's newline
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 0
        journal.record("a", [10, 1], 0.25)
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 1 and journal.result("a", [10, 1]) == 0.25
    assert b"\x00" not in path.read_bytes()


def test_a_finished_journal_is_removed_and_an_unfinished_one_kept(tmp_path):
    path = tmp_path / "sub.csv.partial"
    with pytest.raises(RuntimeError), open_journal(path, FINGERPRINT, "predict") as journal:
        journal.record("a", [10, 1], 0.25)
        raise RuntimeError("a patient failed")
    assert path.is_file()
    with open_journal(path, FINGERPRINT, "predict") as journal:
        journal.finish()
    assert not path.exists()
    # A run that failed before it finished any patient leaves nothing to resume from; one
    # holding an earlier run's results keeps them, whatever stopped it.
    with pytest.raises(RuntimeError), open_journal(path, FINGERPRINT, "predict"):
        assert path.is_file()
        raise RuntimeError("no patient readable")
    assert not path.exists()
    with pytest.raises(KeyboardInterrupt), open_journal(path, FINGERPRINT, "predict") as journal:
        journal.record("a", [10, 1], 0.25)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.held == 1
        raise KeyboardInterrupt
    with open_journal(path, FINGERPRINT, "predict") as journal:
        assert journal.result("a", [10, 1]) == 0.25


def test_a_run_waiting_on_a_journal_deleted_under_it_takes_a_new_one(tmp_path, monkeypatch):
    """A run that opened the journal just before its holder finished (and deleted it) must not
    lock the deleted file: a third run would then write beside it unnoticed."""
    from kdsb.io import atomic

    path = tmp_path / "sub.csv.partial"
    path.write_bytes(b"")
    opens = []
    real_open = open

    def open_then_delete(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        opens.append(file)
        if len(opens) == 1:  # the holder finishes right after this open
            path.unlink()
        return handle

    monkeypatch.setattr(atomic, "open", open_then_delete, raising=False)
    with open_journal(path, FINGERPRINT, "predict") as journal:
        journal.record("a", [10, 1], 0.25)
    assert opens == [path, path]  # the deleted file let go, the new one taken
    assert journal.held == 0 and len(path.read_text().splitlines()) == 2


def test_stale_temporaries_of_named_targets_only_are_removed(tmp_path):
    from kdsb.io.atomic import TEMP_PREFIX, remove_stale_temporaries

    names = ["p-1.h5", "p-1.png", "predictions.csv", "peaks.csv"]
    for name in names:
        (tmp_path / f"{TEMP_PREFIX}123-0a1b2c3d-{name}").write_text("partial")
    (tmp_path / "p-1.h5").write_text("kept")

    assert remove_stale_temporaries(tmp_path, {"p-1.h5", "p-1.png", "peaks.csv"}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{TEMP_PREFIX}123-0a1b2c3d-predictions.csv", "p-1.h5"]
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["p-1.h5"]


def test_an_atomic_write_never_replaces_what_is_not_a_regular_file(tmp_path):
    """Found by a user's trial: a file renamed onto /dev/stdout's link replaced it for every
    process on the machine. A link to a regular file is replaced as before."""
    from kdsb.errors import KdsbError
    from kdsb.io.atomic import write_text

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "stdout").symlink_to("/dev/null")
    for target in ("fifo", "stdout"):
        with pytest.raises(KdsbError, match=f"^{tmp_path / target}: expected a regular file to "
                                            "write, received something else"):
            write_text(tmp_path / target, "x")
    assert (tmp_path / "stdout").is_symlink() and Path("/dev/null").is_char_device()
    with pytest.raises(KdsbError, match="^/dev/stdout: expected a regular file"):
        write_text("/dev/stdout", "x")  # wherever it leads (a redirected file: review)
    if Path("/dev/shm").is_dir():  # a memory disk is no link: written as anywhere
        shm = Path("/dev/shm") / f"kdsb-test-{os.getpid()}.txt"
        try:
            assert write_text(shm, "x").read_text() == "x"
        finally:
            shm.unlink(missing_ok=True)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    (tmp_path / "real.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to(tmp_path / "real.csv")
    write_text(tmp_path / "link.csv", "new")
    assert (tmp_path / "link.csv").read_text() == "new" and (tmp_path / "real.csv").read_text() \
        == "old"
