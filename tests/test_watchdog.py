"""StopWatchdog: after a stop signal, a main thread stuck in one call ends the process; one that runs on,
or that was told the stop is agreed, is left alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

GRACE_S = 0.5
ITERATIONS = 6_000_000  # one pbkdf2 call: about a second (0.18 s per million here), signals or not

SCRIPT = """
import hashlib, os, signal, sys, time
from fastse.engine.watchdog import StopWatchdog
signal.signal(signal.SIGTERM, lambda *_: print("noted", flush=True))
with StopWatchdog([signal.SIGTERM], grace_s={grace}) as watchdog:
    if {signal}:
        print("signalled at", time.monotonic(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
    if {stand_down}:
        watchdog.stand_down()
    end = time.monotonic() + {seconds}
    if {busy}:  # Python code that keeps moving
        while time.monotonic() < end:
            sum(range(100))
    else:  # C calls that release the GIL and each outlast the grace, as a collective waiting for a dead peer
        while time.monotonic() < end:
            hashlib.pbkdf2_hmac("sha256", b"key", b"salt", {iterations})
print("finished", flush=True)
"""


def run(*, signal_: bool = True, busy: bool = False, stand_down: bool = False,
        seconds: float = 4.0) -> tuple[subprocess.CompletedProcess, float]:
    """The script's exit and the seconds from its stop signal to its end (CLOCK_MONOTONIC is system-wide)."""
    code = SCRIPT.format(grace=GRACE_S, signal=signal_, stand_down=stand_down, seconds=seconds, busy=busy,
                         iterations=ITERATIONS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    ended = time.monotonic()
    signalled = [float(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("signalled at")]
    return done, ended - signalled[0] if signalled else float("nan")


def test_stuck_in_one_call_after_a_stop_signal_exits_like_the_signal():
    done, seconds = run(seconds=30.0)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "finished" not in done.stdout
    assert "SIGTERM received, but this process has been stuck in one call" in done.stderr
    assert seconds < 10  # long before the calls would have ended


@pytest.mark.parametrize("case", ["no signal", "running Python", "stop agreed"])
def test_a_process_that_is_not_stuck_or_not_signalled_is_left_alone(case):
    done, _ = run(signal_=case != "no signal", busy=case == "running Python", stand_down=case == "stop agreed")
    assert done.returncode == 0, done.stderr
    assert "finished" in done.stdout and "stuck" not in done.stderr


def test_the_previous_wakeup_fd_comes_back():
    code = ("import os, signal\nfrom fastse.engine.watchdog import StopWatchdog\nr, w = os.pipe()\n"
            "os.set_blocking(w, False)\nsignal.set_wakeup_fd(w)\n"
            "with StopWatchdog([signal.SIGTERM], grace_s=1): pass\nassert signal.set_wakeup_fd(-1) == w\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
