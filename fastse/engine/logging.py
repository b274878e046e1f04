"""Run output: `metrics.jsonl` in the run folder, a one-line progress print, and wandb (imported lazily).

Only rank 0 writes; on the other ranks a `RunLog` is built with `enabled=False` and does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fastse")


def wandb_mode(mode: str) -> str:
    """`auto` -> "online" where wandb credentials are configured (WANDB_API_KEY, or an api.wandb.ai
    entry in the netrc file), else "offline"; other modes as given."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if netrc.netrc(path).authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


class RunLog:
    """Appends one JSON object per `log` call to `run_dir/metrics.jsonl` (a resumed run continues
    the file) and sends it to wandb (mode online | offline | disabled | auto) with the config."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], *, wandb: str = "auto",
                 project: str = "fastse", enabled: bool = True):
        self.enabled, self.run = enabled, None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)  # line-buffered; closed in close()
        mode = wandb_mode(wandb)
        if mode != "disabled":
            try:
                import wandb as wb
            except ImportError:
                log.warning("wandb is not installed: metrics go to %s only", self.path)
                return
            self.run = wb.init(project=project, config=config, dir=str(run_dir), mode=mode, name=Path(run_dir).name)

    def log(self, metrics: dict[str, Any]) -> None:
        """Record `metrics` (must hold "step"); non-finite floats are written as null."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def progress_line(m: dict[str, Any], total_steps: int, epochs: int) -> str:
    """One line: epochs done, step, loss, lr, teacher momentum, updated fraction, distance, img/s, ETA."""
    parts = [f"epoch {m['epoch']:.2f}/{epochs}", f"step {m['step']}/{total_steps}", f"loss {m['loss']:.4f}",
             f"lr {m['lr']:.4g}", f"m {m['momentum']:.5f}"]
    if "updated_fraction" in m:
        parts.append(f"upd {m['updated_fraction']:.2f}")
    if "distance" in m:
        parts.append(f"dist {m['distance']:.4f}")
    parts.append(f"{m['img_per_s']:,.0f} img/s")
    if m["img_per_s"] > 0 and "eta_s" in m:
        parts.append(f"eta {_duration(m['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
