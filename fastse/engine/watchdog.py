"""End a process that cannot honour a stop signal because its main thread is stuck in one C call.

The trainers turn SIGTERM, SIGUSR1 and Ctrl-C into "stop at the next log line with a checkpoint", which
needs every rank to reach that line. When a peer rank is gone (killed, out of memory), the others wait in
a collective that never completes: one C call (NCCL, gloo) that never returns to Python, so the stop is
never reached and the launcher's SIGTERM waits out its grace period (torchrun: 30 s) for a SIGKILL.

`StopWatchdog` watches from a thread. Once a stop signal arrived it probes the main thread every
`grace_s` seconds with `PROBE`, a signal whose Python handler only answers: Python runs signal handlers
in the main thread between bytecodes, so a main thread that runs Python (steps, a kNN check, a
checkpoint) answers within milliseconds. No answer within `grace_s`: the process ends at once with exit
status 128 + the stop signal's number, as the signal's default action would have.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from collections.abc import Iterable
from types import FrameType, TracebackType

PROBE = signal.SIGURG  # ignored by default and unused by training code; handled by the watchdog while active


class StopWatchdog:
    """Context manager, entered in the main thread after Python handlers for `signals` are installed
    (they reach the watchdog through `signal.set_wakeup_fd`). On exit the previous wakeup fd and `PROBE`
    handler come back. `stand_down()`: the stop was agreed, so a long call from now on (a checkpoint's
    fsync) is expected and no longer probed."""

    def __init__(self, signals: Iterable[int], grace_s: float):
        self.signals = frozenset(int(s) for s in signals)
        self.grace_s = float(grace_s)
        self._done, self._answered = threading.Event(), threading.Event()

    def __enter__(self) -> StopWatchdog:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopWatchdog must be entered in the main thread")
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous_probe = signal.signal(PROBE, self._answer)
        self._thread = threading.Thread(target=self._watch, name="fastse-stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None):
        self._done.set()
        self._thread.join()
        signal.set_wakeup_fd(self._previous_fd)
        signal.signal(PROBE, self._previous_probe)
        os.close(self._read)
        os.close(self._write)

    def stand_down(self) -> None:
        self._done.set()

    def _answer(self, signum: int, frame: FrameType | None) -> None:
        self._answered.set()

    def _stop_signal(self) -> int | None:
        """Block until a stop signal's byte arrives (its number) or `_done` (None)."""
        while not self._done.is_set():
            if select.select([self._read], [], [], 0.1)[0]:
                try:
                    received = [s for s in os.read(self._read, 512) if s in self.signals]
                except BlockingIOError:
                    continue
                if received:
                    return received[0]
        return None

    def _watch(self) -> None:
        received = self._stop_signal()
        main = threading.main_thread().ident
        while received is not None and not self._done.is_set():
            self._answered.clear()
            signal.pthread_kill(main, PROBE)
            if not self._answered.wait(self.grace_s) and not self._done.is_set():
                sys.stderr.write(f"fastse: {signal.Signals(received).name} received, but this process has been "
                                 f"stuck in one call for {self.grace_s:g} s (waiting for a rank that is gone?): "
                                 "exiting without a checkpoint; --resume continues from the last one\n")
                sys.stderr.flush()
                os._exit(128 + received)
            self._done.wait(self.grace_s)
