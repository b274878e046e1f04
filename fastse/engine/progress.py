"""Progress people can read: a live bar with an ETA (tqdm) where the output is a terminal, and only the plain
periodic lines the loops print (their log lines, with their own ETA) where it is not (SLURM logs, pipes).

One bar is live at a time (`Progress`, a context manager); `echo` prints a line above it, so the bar stays
at the bottom of the terminal, or plainly when there is no bar. `FASTSE_PROGRESS=plain` turns the bar off
on a terminal too, `FASTSE_PROGRESS=bar` forces it.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

_active: Progress | None = None  # the live bar that `echo` writes above


def bar_wanted(stream: TextIO | None = None) -> bool:
    """Whether a live bar suits `stream` (default stderr, where tqdm draws): FASTSE_PROGRESS=bar|plain,
    else whether it is a terminal."""
    choice = os.environ.get("FASTSE_PROGRESS", "").strip().lower()
    if choice in ("bar", "plain"):
        return choice == "bar"
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def echo(text: str) -> None:
    """Print one line (flushed): above the live bar where there is one."""
    if _active is not None and _active.bar is not None:
        _active.bar.write(text, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(text, flush=True)


class Progress:
    """A bar of `total` units starting at `initial`, with rate and ETA, on a terminal (`bar` None: see
    `bar_wanted`); elsewhere it draws nothing. `update` is cheap (no device sync): call it every step."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "step", enabled: bool = True,
                 bar: bool | None = None):
        self.total, self.done, self.bar = total, initial, None
        if enabled and (bar_wanted() if bar is None else bar):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True,
                            file=sys.stderr, smoothing=0.1)

    def __enter__(self) -> Progress:
        global _active
        self._previous, _active = _active, self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        self.close()
        _active = self._previous

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def postfix(self, **values: Any) -> None:
        """Values shown after the bar (e.g. loss=0.123), where there is a bar."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()},
                                 refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def postfix(**values: Any) -> None:
    """`Progress.postfix` of the live bar, if any."""
    if _active is not None:
        _active.postfix(**values)


class EpochReport:
    """Plain lines for a loop over `total` epochs, one every `every` epochs (default: about ten in all):
    `eta(epoch)` from the epochs since the first (whose time may hold a set-up, e.g. extracting features);
    call `tick(epoch)` at the end of every epoch."""

    def __init__(self, total: int, every: int | None = None):
        self.total, self.every = total, every or max(1, round(total / 10))
        self.started, self.first = time.perf_counter(), None

    def tick(self, epoch: int) -> None:
        if epoch == 1:
            self.first = time.perf_counter()

    def eta(self, epoch: int) -> str:
        now = time.perf_counter()
        if self.first is not None and epoch > 1:
            per_epoch = (now - self.first) / (epoch - 1)
        else:
            per_epoch = (now - self.started) / max(epoch, 1)
        return duration(per_epoch * (self.total - epoch))


def duration(seconds: float) -> str:
    """12m05s, or 3h07m from an hour."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
