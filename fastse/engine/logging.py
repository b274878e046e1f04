"""Run output: `metrics.jsonl` in the run folder, a one-line progress print, and wandb (imported lazily);
`run.json` records the config and, for every start of the run, where and from what code it ran.

Only rank 0 writes; on the other ranks a `RunLog` is built with `enabled=False` and does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastse.atomic import write_atomic

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
    """Appends one JSON object per `log` call to `run_dir/metrics.jsonl` and sends it to wandb (mode
    online | offline | disabled | auto) with the config. Each line also gets `wall_s`, the seconds since
    this RunLog opened (this process's start of the run, compilation included; a resumed run counts from its
    resume, and run.json lists every start). A run that starts at step `resume_step` (its
    checkpoint's; 0 for a fresh start) continues the file without the lines of later steps, which the
    previous attempt wrote before it stopped and this one writes again (see `truncate_metrics`)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], *, wandb: str = "auto",
                 project: str = "fastse", enabled: bool = True, resume_step: int | None = None):
        self.enabled, self.run, self.opened = enabled, None, time.monotonic()
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record_start(self.path.parent, config)
        if resume_step is not None and self.path.exists():
            truncate_metrics(self.path, resume_step)
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
        """Record `metrics` (must hold "step") and `wall_s`; non-finite floats are written as null."""
        if not self.enabled:
            return
        metrics = {**metrics, "wall_s": round(time.monotonic() - self.opened, 2)}
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


def truncate_metrics(path: Path, step: int) -> None:
    """Rewrite the JSON-lines file `path` keeping the lines of steps <= `step` and those without a step;
    a line cut short by a crash is dropped (or ended, where only its newline is missing). Atomic (a
    temp file, fsynced, renamed over it): a crash leaves the old file or the new one. Nothing is
    written if every line stays."""
    text = path.read_text()
    lines, kept = text.splitlines(), []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line)
    if len(kept) == len(lines) and text.endswith("\n") or not text:
        return
    write_atomic(path, "".join(line + "\n" for line in kept))
    log.info("%s: dropped %d line(s) after step %d (written again on resuming)", path, len(lines) - len(kept), step)


RUN_INFO = "run.json"


def record_start(run_dir: Path, config: dict[str, Any]) -> None:
    """Write `run_dir/run.json` = {"config": config, "starts": [...]}: one entry per start of the run (a
    resumed run adds one) with its time, command line, git commit (`FASTSE_COMMIT` where the code is not
    a git checkout) and device, for reports. Atomic (temp file renamed over it)."""
    import torch  # loaded already by every caller

    path = run_dir / RUN_INFO
    try:
        starts = json.loads(path.read_text())["starts"]
    except (OSError, ValueError, KeyError, TypeError):
        starts = []
    device = str(config.get("device", "auto"))
    if device != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device) if device.startswith("cuda:") else None)
        world = int(os.environ.get("WORLD_SIZE", 1))
        device = f"{world} x {name}" if world > 1 else name
    else:
        device = "cpu"
    starts.append({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv,
                   "commit": _commit(), "device": device, "torch": torch.__version__})
    write_atomic(path, json.dumps({"config": config, "starts": starts}, indent=1, default=str) + "\n")


def _commit() -> str | None:
    """FASTSE_COMMIT, else the checkout's HEAD (+ "-dirty" with uncommitted changes to tracked files)."""
    if os.environ.get("FASTSE_COMMIT"):
        return os.environ["FASTSE_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists() or not (repo / "pyproject.toml").is_file():
        return None
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "") if head else None
    except (OSError, subprocess.SubprocessError):
        return None


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
