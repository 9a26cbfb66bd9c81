"""How the `kdsb` command takes Ctrl-C and SIGTERM.

Ctrl-C raises KeyboardInterrupt in the main thread, and each command stops as it does for an
error: its workers stopped, its files whole or absent, exit 130. Python raises it only when the
main thread next runs Python code, so while TensorFlow computes a training step or waits for a
batch (seconds to minutes for whole volumes on a CPU, or for ever behind a reader stuck on a
network disk) Ctrl-C waits too. A Ctrl-C that arrives while an earlier one has waited
`STUCK_AFTER_S` untaken ends the process at once, as a kill would, after the clean-ups
registered with `at_forced_stop` (the preprocess pool's workers are stopped): every file kdsb
writes is whole or absent (written under a temporary name, then renamed), a training run
resumes from its last checkpoint, and `kdsb preprocess` goes on with the patients it had not
written. A Ctrl-C while the main thread is running Python (a command stopping) is Python's as
before.

Python's handlers run in the main thread only; a thread of ours reads the byte that the
interpreter writes for each signal to `signal.set_wakeup_fd` as the signal arrives, which it
does whatever the main thread is doing, and watches whether the main thread takes it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

EXIT_INTERRUPTED = 130
# A Ctrl-C the main thread has not taken this long after it arrived is waiting for it (Python
# takes one within microseconds while it runs Python code).
STUCK_AFTER_S = 0.5
# How long the forced stop's line may take to write (stderr may be a pipe nobody reads).
LINE_TIMEOUT_S = 1.0

_last_taken = float("-inf")  # monotonic time the main thread last took a Ctrl-C (it alone writes)
_message = "kdsb: interrupted"  # what a forced stop prints; `describe` sets the command's
_clean_ups: list[Callable[[], None]] = []


def interrupt_on_sigterm() -> None:
    """Take SIGTERM (`timeout`, `kill`, `docker stop`, a Slurm job's end) as Ctrl-C: the
    command stops as an interrupted run does (its workers stopped, its files whole or absent,
    exit 130), not killed outright with its worker processes left writing (found in review)."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)


def describe(command: str, advice: str) -> None:
    """Name the running command and what to do after it stopped, for a forced stop's line."""
    global _message
    _message = f"{command}: interrupted again before it could stop: stopped at once; {advice}"


def at_forced_stop(clean_up: Callable[[], None]) -> None:
    """Have `clean_up()` run (in another thread than the stuck main one) before a forced stop:
    what a kill of this process alone would leave behind, such as worker processes."""
    _clean_ups.append(clean_up)


def stop_at_second_ctrl_c() -> bool:
    """From now on, a Ctrl-C that arrives while an earlier one still waits for the main thread
    ends the process at once (exit 130). Call it from the main thread. Nothing happens where
    Ctrl-C is ignored (a job started in the background by a shell without job control) or has a
    handler of someone else's, nor off POSIX. Returns whether it was set up."""
    if os.name != "posix" or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    # The handler first: a Ctrl-C the watcher sees is always one `_take` notes.
    signal.signal(signal.SIGINT, _take)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_end,), name="kdsb-interrupts",
                     daemon=True).start()
    return True


def _take(signum, frame) -> None:
    """The main thread's Ctrl-C handler: Python's own, its time noted."""
    global _last_taken
    _last_taken = time.monotonic()
    raise KeyboardInterrupt


def _watch(read_end: int) -> None:
    """Stop the process when a Ctrl-C arrives while an earlier one waits untaken.

    A Ctrl-C counts as taken when the main thread took one within `STUCK_AFTER_S` of the
    moment this thread read its byte, before or after: the main thread may take it before this
    thread reads it, and Python merges Ctrl-Cs that wait together into one KeyboardInterrupt,
    so takes and arrivals are not counted one for one."""
    stuck_since = None  # when a Ctrl-C found waiting untaken was read
    while True:
        try:
            received = os.read(read_end, 512)
        except OSError:
            return
        if not received:
            return
        for signum in received:
            if signum != signal.SIGINT:
                continue
            now = time.monotonic()
            if stuck_since is not None and _last_taken < stuck_since:
                _stop_now()
            deadline = now + STUCK_AFTER_S
            while _last_taken < now - STUCK_AFTER_S and time.monotonic() < deadline:
                time.sleep(0.02)
            stuck_since = now if _last_taken < now - STUCK_AFTER_S else None


def _stop_now() -> None:
    """Run the clean-ups, say so and leave without the interpreter's clean-up (it would wait
    for the main thread). The line is written from a thread of its own, waited for
    `LINE_TIMEOUT_S` at most: stderr may be a pipe nobody reads, and the stuck main thread may
    hold the lock of Python's `sys.stderr`, so it goes straight to file descriptor 2."""
    try:
        for clean_up in _clean_ups:
            try:
                clean_up()
            except Exception:  # noqa: BLE001 - a failed clean-up must not keep the process
                pass
        writer = threading.Thread(target=_write_line, daemon=True)
        writer.start()
        writer.join(LINE_TIMEOUT_S)
    finally:
        os._exit(EXIT_INTERRUPTED)


def _write_line() -> None:
    try:
        os.write(2, f"{_message}\n".encode(errors="replace"))
    except OSError:
        pass
