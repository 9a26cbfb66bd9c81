"""How the `kdsb` command takes Ctrl-C and SIGTERM.

Ctrl-C raises KeyboardInterrupt in the main thread, and each command stops as it does for an
error: its workers stopped, its files whole or absent, exit 130. Python raises it only when the
main thread next runs Python code, so while TensorFlow computes a training step or waits for a
batch (seconds to minutes for whole volumes on a CPU, or for ever behind a reader stuck on a
network disk) Ctrl-C waits too. A second Ctrl-C while the first is still waiting to be taken
ends the process at once, as a kill would: every file kdsb writes is whole or absent (written
under a temporary name, then renamed), a training run resumes from its last checkpoint, and
`kdsb preprocess` goes on with the patients it had not written. A second Ctrl-C after the
first was taken (the command is stopping) is Python's as before.

Python's handlers run in the main thread only; a thread of ours reads the byte that the
interpreter writes for each signal to `signal.set_wakeup_fd` as the signal arrives, which it
does whatever the main thread is doing.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_INTERRUPTED = 130

_lock = threading.Lock()
_arrived = 0  # Ctrl-Cs the process received (counted by the watcher)
_taken = 0  # Ctrl-Cs the main thread turned into KeyboardInterrupt
_message = "kdsb: interrupted"  # what a forced stop prints; `describe` sets the command's


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


def stop_at_second_ctrl_c() -> bool:
    """From now on, a second Ctrl-C that arrives while the first still waits for the main
    thread ends the process at once (exit 130). Call it from the main thread. Nothing happens
    where Ctrl-C is ignored (a job started in the background by a shell without job control)
    or has a handler of someone else's. Returns whether it was set up."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _take)
    threading.Thread(target=_watch, args=(read_end,), name="kdsb-interrupts",
                     daemon=True).start()
    return True


def _take(signum, frame) -> None:
    """The main thread's Ctrl-C handler: Python's own, counted."""
    global _taken
    with _lock:
        _taken += 1
    raise KeyboardInterrupt


def _watch(read_end: int) -> None:
    """Count the Ctrl-Cs as they arrive; stop the process when two wait untaken."""
    global _arrived
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
            with _lock:
                _arrived += 1
                waiting = _arrived - _taken
            if waiting >= 2:
                _stop_now()


def _stop_now() -> None:
    """Say so and leave without the interpreter's clean-up (it would wait for the main thread).
    The line goes straight to file descriptor 2: the stuck main thread may hold the lock of
    Python's `sys.stderr` (a write blocked on a full pipe)."""
    try:
        os.write(2, f"{_message}\n".encode(errors="replace"))
    except OSError:
        pass
    finally:
        os._exit(EXIT_INTERRUPTED)
