"""Run output: `metrics.jsonl` in the run folder, a one-line progress print, and wandb (imported lazily);
`run.json` records the config and, for every start of the run, where and from what code it ran.

wandb follows its own environment (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_DIR, WANDB_API_KEY), which
the settings given (`--wandb*` flags) override. A run folder's wandb run id is kept in `wandb_run.json`: a
resumed run continues that wandb run (`resume="allow"`, steps always increasing) and the evaluation
commands write their results into it (`EvalLog`). docs/WANDB.md says what is logged where.

Only rank 0 writes; on the other ranks a `RunLog` is built with `enabled=False` and does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastse.atomic import write_atomic
from fastse.engine.progress import duration
from fastse.wandb_settings import wandb_mode, wandb_tags

log = logging.getLogger("fastse")


WANDB_RUN = "wandb_run.json"  # in the run folder: the wandb run's id, project and entity, the last step logged
def wandb_options(config: Any, job_type: str) -> dict[str, Any]:
    """The keyword arguments of `RunLog` for the wandb settings of a run config, and the run's `job_type`."""
    get = lambda name: getattr(config, name, None)
    return {"wandb": get("wandb") or "auto", "project": get("wandb_project"), "entity": get("wandb_entity"),
            "group": get("wandb_group"), "tags": wandb_tags(get("wandb_tags")), "name": get("wandb_name"),
            "job_type": job_type}


def read_wandb_run(folder: str | Path) -> dict[str, Any] | None:
    """The wandb run recorded in the run folder `folder` ({"id", "project", "entity", "step", ...}), or None."""
    try:
        info = json.loads((Path(folder) / WANDB_RUN).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("id"), str) and info["id"] else None


def _write_wandb_run(folder: Path, info: dict[str, Any]) -> None:
    write_atomic(folder / WANDB_RUN, json.dumps(info, indent=1) + "\n")


def _records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of the JSON-lines file `path`, other lines skipped; none where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    yield record
    except OSError:
        return


def _last_step(path: Path) -> int:
    """The largest "step" in the JSON-lines file `path` (0 when it has none)."""
    return max([0, *(r["step"] for r in _records(path) if isinstance(r.get("step"), int))])


def _new_run_id() -> str:
    """A wandb run id: 8 lowercase letters and digits, as wandb makes them."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _wandb_dir(default: Path) -> str:
    """Where wandb writes its files (in a wandb/ folder there): WANDB_DIR where set, else `default`. Read
    here, not left to wandb, which reads its environment once per process."""
    return os.environ.get("WANDB_DIR") or str(default)


def _version_config() -> dict[str, Any]:
    import fastse

    return {"fastse_version": fastse.__version__, "git_commit": git_commit()}


def _define_metrics(run: Any) -> None:
    """kNN, probe and linear accuracy (the monitor's, the best so far and the evaluation commands') against
    pretraining epochs."""
    run.define_metric("epoch")
    for pattern in ("knn_*", "probe_*", "best_*", "eval/*"):
        run.define_metric(pattern, step_metric="epoch")


class _Log:
    """A metrics file (`file`) and, where wandb is on, a wandb run (`run`) of this process."""

    enabled: bool

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


class RunLog(_Log):
    """Appends one JSON object per `log` call to `run_dir/metrics.jsonl` and sends it to wandb (mode
    online | offline | disabled | auto, see `wandb_mode`) with the config, the fastse version and the git
    commit. Each line also gets `wall_s`, the seconds since this RunLog opened (this process's start of the
    run, compilation included; a resumed run counts from its resume, and run.json lists every start). A run
    that starts at step `resume_step` (its checkpoint's; 0 for a fresh start) continues the file without the
    lines of later steps, which the previous attempt wrote before it stopped and this one writes again (see
    `truncate_metrics`).

    wandb: `project` (else WANDB_PROJECT, else "fastse"), `entity` (else WANDB_ENTITY), `group`, `tags`,
    `name` (else the run folder's name) and `job_type` go to `wandb.init`; its files go under WANDB_DIR, else
    the run folder. A fresh start records the new run's id in `run_dir/wandb_run.json`; a resumed one
    (`resume_step` > 0) continues that run (its project and entity unless given) and sends only the steps
    after the last one the run has (metrics.jsonl, evaluations), so wandb's steps always increase."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], *, wandb: str = "auto",
                 project: str | None = None, entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, name: str | None = None, job_type: str | None = None,
                 enabled: bool = True, resume_step: int | None = None):
        # wandb has the steps up to `wandb_after` (-1: none; a resumed run: those its previous attempts sent)
        self.enabled, self.run, self.opened, self.wandb_after = enabled, None, time.monotonic(), -1
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record_start(self.path.parent, config)
        last = _last_step(self.path) if resume_step else 0  # what the previous attempts sent to wandb
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
            folder = self.path.parent
            recorded = read_wandb_run(folder) if resume_step else None
            run_id = recorded["id"] if recorded else _new_run_id()
            if recorded:
                self.wandb_after = max(last, int(recorded.get("step") or 0))
            was = recorded or {}  # a resumed run keeps its project, entity and name unless given
            project = project or was.get("project") or os.environ.get("WANDB_PROJECT") or "fastse"
            entity = entity or was.get("entity") or os.environ.get("WANDB_ENTITY") or None
            name = name or was.get("name") or folder.name
            self.run = wb.init(project=project, entity=entity, group=group, tags=tags, name=name, job_type=job_type,
                               id=run_id, resume="allow", dir=_wandb_dir(folder), mode=mode,
                               config={**config, **_version_config()})
            if job_type != "semi":  # FixMatch counts steps (its best_* too), not epochs
                _define_metrics(self.run)
            _write_wandb_run(folder, {"id": run_id, "project": project, "entity": entity or self.run.entity or None,
                                      "name": name, "group": group or was.get("group"), "mode": mode,
                                      "step": max(self.wandb_after, 0)})

    def log(self, metrics: dict[str, Any]) -> None:
        """Record `metrics` (must hold "step") and `wall_s`; non-finite floats are written as null."""
        if not self.enabled:
            return
        metrics = {**metrics, "wall_s": round(time.monotonic() - self.opened, 2)}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps(clean) + "\n")
        if self.run is not None and int(metrics["step"]) > self.wandb_after:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def image(self, key: str, path: str | Path, *, step: int, caption: str = "") -> None:
        """Send the picture file `path` to wandb as the image `key` at `step` (wandb.Image; not in
        metrics.jsonl: the file is in the run folder). Nothing where wandb does not log or has that step."""
        if self.enabled and self.run is not None and step >= self.wandb_after:
            import wandb as wb

            self.run.log({key: wb.Image(str(path), caption=caption or None)}, step=step)

    def print(self, text: str) -> None:
        if self.enabled:
            from fastse.engine.progress import echo

            echo(text)


class EvalLog(_Log):
    """Where `fastse knn` and `fastse eval-linear` send a result `key` ("knn", "linear_fast", ...). On a run
    folder with a wandb run (`wandb_run.json`): into that run, continued (its project and entity): the
    top-1/top-5 in its summary and in one history row, after the run's last step, at the epoch the run
    reached ("eval/<key>_top1" against "epoch", beside the kNN monitor), and the evaluation's own curve
    (`epoch`) as a chart. Otherwise in a run of its own (job_type "eval"; `project`, `entity`, `group`,
    `tags`, `name` as for `RunLog`) whose steps are the evaluation's epochs. Either way `log_dir/run.json`
    and one JSON line per call in `log_dir/metrics.jsonl`. Nothing at all when wandb is disabled or
    `enabled` is False."""

    def __init__(self, key: str, config: dict[str, Any], *, log_dir: Path, run_folder: Path | None = None,
                 wandb: str = "auto", project: str | None = None, entity: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, name: str | None = None, enabled: bool = True):
        self.key, self.run, self.rows, self.target = key, None, [], None
        self.enabled = enabled and wandb_mode(wandb) != "disabled"
        if not self.enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)  # OSError (a read-only folder): the caller goes on without
        record_start(log_dir, config)  # run.json: what was evaluated, how ("eval": key), from what code
        self.file = open(log_dir / "metrics.jsonl", "a", buffering=1)
        try:
            import wandb as wb
        except ImportError:
            log.warning("wandb is not installed: %s goes to %s only", key, log_dir / "metrics.jsonl")
            return
        self.wb, mode = wb, wandb_mode(wandb)
        recorded = read_wandb_run(run_folder) if run_folder is not None else None
        config = {**config, **_version_config()}
        try:  # the result matters more than its dashboard: wandb's failures (files, network) are warnings
            if recorded:
                (run_folder / "wandb").mkdir(exist_ok=True)
                self.target, self.recorded = run_folder, recorded
                self.step = max(_last_step(run_folder / "metrics.jsonl"), int(recorded.get("step") or 0)) + 1
                self.run_epoch = _run_epoch(run_folder)
                self.run = wb.init(id=recorded["id"], resume="allow", project=recorded.get("project"),
                                   entity=recorded.get("entity"), dir=_wandb_dir(run_folder), mode=mode,
                                   config={f"eval/{key}": config})
                _define_metrics(self.run)
            else:
                self.run = wb.init(project=project or os.environ.get("WANDB_PROJECT") or "fastse", entity=entity,
                                   group=group, tags=tags, name=name, job_type="eval", dir=_wandb_dir(log_dir),
                                   mode=mode, config=config)
                self.run.define_metric("epoch")
                self.run.define_metric("*", step_metric="epoch")
        except Exception as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.warning("wandb did not start (%s): %s goes to %s only", reason, key, log_dir / "metrics.jsonl")
            self.run = None

    def epoch(self, metrics: dict[str, Any]) -> None:
        """A point of the evaluation's own curve: {"epoch": e, "train_loss": ..., "test_top1": ...}."""
        if not self.enabled:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.rows.append(metrics)
        if self.run is not None and self.target is None:
            self.run.log(dict(metrics), step=int(metrics["epoch"]))

    def result(self, metrics: dict[str, Any]) -> None:
        """The final result ({"top1", "top5", ...}): summary, history row and chart."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"result": True, **metrics}) + "\n")
        if self.run is None:
            return
        if self.target is None:
            last = int(self.rows[-1]["epoch"]) if self.rows else 0
            self.run.log({"top1": metrics["top1"], "top5": metrics["top5"], "epoch": last}, step=last)
            self.run.summary.update(metrics)
            return
        scores = {f"eval/{self.key}_{k}": metrics[k] for k in ("top1", "top5")}
        row: dict[str, Any] = {**scores, "epoch": self.run_epoch}
        curve = [m for m in self.rows if "test_top1" in m] or self.rows
        if curve:
            y = "test_top1" if "test_top1" in curve[0] else "train_loss"
            table = self.wb.Table(columns=["epoch", y], data=[[m["epoch"], m[y]] for m in curve])
            row[f"eval/{self.key}_curve"] = self.wb.plot.line(table, "epoch", y, title=f"{self.key}: {y} by epoch")
        self.run.log(row, step=self.step)
        self.run.summary.update(scores)
        _write_wandb_run(self.target, {**self.recorded, "step": self.step})


def _run_epoch(folder: Path) -> float | None:
    """The epoch of the run folder's newest checkpoint (what an evaluation of the folder measures), else
    the last epoch in its metrics.jsonl, else None."""
    from fastse.checkpoints import META, latest_checkpoint

    try:
        latest = latest_checkpoint(folder, verify=False)
        if latest is not None:
            epoch = json.loads((latest / META).read_text()).get("epoch")
            if isinstance(epoch, (int, float)):
                return epoch
    except (OSError, ValueError):
        pass
    epochs = [r["epoch"] for r in _records(folder / "metrics.jsonl") if isinstance(r.get("epoch"), (int, float))]
    return epochs[-1] if epochs else None


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
                   "commit": git_commit(), "device": device, "torch": torch.__version__})
    write_atomic(path, json.dumps({"config": config, "starts": starts}, indent=1, default=str) + "\n")


def git_commit() -> str | None:
    """FASTSE_COMMIT, else the checkout's HEAD (+ "-dirty" with uncommitted changes to tracked files); None
    outside a git checkout."""
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
        parts.append(f"eta {duration(m['eta_s'])}")
    return " | ".join(parts)


def teacher_stats(smoother: Any, *, momentum: bool = False) -> dict[str, float]:
    """The teacher's statistics of a metrics line from `smoother` (a `fastse.smoothing.Smoother`; a host
    sync): "updated_fraction" and "distance" and, with `momentum`, the momentum of its last step (pretraining
    logs its scheduled momentum instead)."""
    s = smoother.stats(distance=True)
    keys = ("momentum", "updated_fraction", "distance") if momentum else ("updated_fraction", "distance")
    return {k: s[k] for k in keys if k in s}
