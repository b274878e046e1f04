"""Run a study: the training and evaluation runs a small spec file lists, resuming where they stopped, then
the report (`fastse report`) of all its run folders.

    python3 benchmarks/study.py benchmarks/studies/sts_vs_ema.toml --data /root/cifar --gpus 0,1,2,3 \\
        --time-budget 3000      # again, as often as needed, until it exits 0
    python3 benchmarks/study.py SPEC --dry-run                    # what is done, what would run, the commands

The spec is TOML (or JSON with the same keys):

    out = "runs/my-study"            # run folders <out>/<name>-s<seed>, logs <out>/logs, report <out>/report
    data = "cifar10"                 # --data of every command (study.py --data overrides it)
    [defaults.pretrain]              # flags of every run of a command: pretrain | semi | eval-linear
    wandb = "disabled"
    [[run]]
    name = "byol-ema"
    command = "pretrain"             # or semi
    preset = "byol-cifar10"
    seeds = [0, 1, 2]                # one run folder each [default: [0]]
    args = { smoothing = "ema" }     # flags without "--": a value, or true / false for --flag / --no-flag
    [[run]]
    name = "linear"
    command = "eval-linear"          # evaluates every seed's folder of the pretraining runs named in `of`
    of = ["byol-ema"]                # (with --seed of that run); the result goes to the folder's eval.json
    args = { protocol = "fast" }

Each (run, seed) is a job. A job is done when its folder holds its final line (pretraining: the kNN of
the last step; FixMatch: the `final` summary) or, for eval-linear, when the folder's eval.json holds the
protocol; done jobs are skipped, the others start with --resume from their newest checkpoint, an
evaluation once its pretraining run is done. Jobs start in spec order (an evaluation right after its
run), one at a time, or with --gpus one per GPU (CUDA_VISIBLE_DEVICES; --jobs-per-gpu K: K at a time on each,
which fills the GPU while a job compiles, starts or evaluates), each job's output appended to
<out>/logs/<job>.log. At --time-budget seconds after the start, or on SIGTERM / Ctrl-C, the running jobs
are stopped (SIGTERM to their process group, SIGKILL after 30 s). A training run stops at its next log
line with a checkpoint, so it loses no steps (only one killed after the 30 s loses those since its last
checkpoint); when it resumes it pays its start-up again (imports, the data cache, torch.compile, and for
pretraining the augmentation of the batches of the interrupted epoch it skips); a stopped eval-linear
starts over. Checkpoint writes are atomic, so a kill never costs more. Exit status: 0 every job done, 3
stopped early (budget or signal) with jobs left: run the same command again, 1 a job failed (its log's
end is printed; the others went on), 2 a bad spec or another study.py already running on the same out
folder.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib.util import find_spec
from pathlib import Path

import tomllib

if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from fastse.report import ReportError, load_run, write_report  # noqa: E402

COMMANDS = ("pretrain", "semi", "eval-linear")
SPEC_KEYS = {"out", "data", "defaults", "run"}
ENTRY_KEYS = {"name", "command", "preset", "seeds", "args", "of"}
MANAGED = {"seed", "out", "resume", "checkpoint", "data", "preset"}  # flags the study sets itself
STOPPED, FAILED, BAD_SPEC = 3, 1, 2


class SpecError(ValueError):
    """A spec that cannot run; the message names the entry."""


@dataclass(eq=False)
class Job:
    """One command of the study: a training run (one seed of a spec entry) or the evaluation of one."""

    name: str
    command: str
    folder: Path  # the run folder it trains or evaluates
    argv: list[str]  # the fastse command line after `fastse`
    seed: int
    after: Job | None = None  # the training run an evaluation waits for
    protocol: str = ""

    def done(self) -> bool:
        try:
            run = load_run(self.folder)
        except ReportError:
            return False
        return self.protocol in run.evals if self.command == "eval-linear" else run.finished

    def state(self) -> str:
        if self.done():
            return "done"
        steps = sorted(int(p.name[5:]) for p in (self.folder / "checkpoints").glob("step-*") if p.name[5:].isdigit())
        if self.command != "eval-linear" and steps:
            return f"resumes at step {steps[-1]}"
        return f"after {self.after.name}" if self.after and not self.after.done() else "new"


# ------------------------------------------------------------------------------------------ spec


def load_spec(path: Path, data: str | None = None) -> tuple[Path, list[Job]]:
    """(out folder, jobs in start order) of the spec file `path`; SpecError on anything wrong in it,
    including flags the fastse command line would refuse (checked here, before anything runs)."""
    try:
        text = path.read_text()
        spec = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: {e}") from None
    out = Path(spec.get("out") or Path("runs") / path.stem)
    data = data or spec.get("data")
    defaults = spec.get("defaults", {})
    if unknown := (set(spec) - SPEC_KEYS) | (set(defaults) - set(COMMANDS)):
        raise SpecError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(SPEC_KEYS))}; "
                        f"defaults.{{{','.join(COMMANDS)}}})")
    if not isinstance(spec.get("run"), list) or not spec["run"]:
        raise SpecError(f"{path}: no [[run]] entries")
    jobs: list[Job] = []
    trained: dict[str, list[Job]] = {}
    names: set[str] = set()
    for i, entry in enumerate(spec["run"]):
        name, command = entry.get("name"), entry.get("command")
        where = f"{path}: run {name or i + 1}"
        if not isinstance(name, str) or not name or "/" in name or name in names:
            raise SpecError(f"{where}: each run needs a name of its own (no '/')")
        names.add(name)
        if command not in COMMANDS:
            raise SpecError(f"{where}: command={command!r} is not one of {', '.join(COMMANDS)}")
        if unknown := set(entry) - ENTRY_KEYS:
            raise SpecError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: "
                            f"{', '.join(sorted(ENTRY_KEYS))}")
        args = {**defaults.get(command, {}), **entry.get("args", {})}
        flags = _flags(args, where) + (["--data", data] if data else [])
        if command == "eval-linear":
            targets = [entry["of"]] if isinstance(entry.get("of"), str) else entry.get("of") or []
            if not targets or any(t not in trained or trained[t][0].command != "pretrain" for t in targets):
                raise SpecError(f"{where}: of={entry.get('of')!r} must name pretrain runs listed before it")
            for run in (job for t in targets for job in trained[t]):
                argv = [command, "--checkpoint", str(run.folder), "--seed", str(run.seed), *flags]
                at = max(k for k, j in enumerate(jobs) if j is run or j.after is run)  # right after its run
                jobs.insert(at + 1, Job(f"{run.name}.{name}", command, run.folder, _checked(argv, where), run.seed,
                                        run, str(args.get("protocol", "byol"))))
            continue
        seeds = entry.get("seeds", [0])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
            raise SpecError(f"{where}: seeds={seeds!r} must be a list of integers >= 0")
        preset = ["--preset", entry["preset"]] if entry.get("preset") else []
        trained[name] = []
        for seed in seeds:
            folder = out / f"{name}-s{seed}"
            argv = [command, *preset, "--seed", str(seed), "--out", str(folder), "--resume", *flags]
            trained[name].append(Job(f"{name}-s{seed}", command, folder, _checked(argv, where), seed))
            jobs.append(trained[name][-1])
    return out, jobs


def _flags(args: dict, where: str) -> list[str]:
    out = []
    for key, value in args.items():
        flag = key.replace("_", "-")
        if flag in MANAGED:
            raise SpecError(f"{where}: {key} is set by the study (seed: `seeds`, preset: `preset`, data: `data`)")
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        elif isinstance(value, (int, float, str)):
            out += [f"--{flag}", str(value)]
        else:
            raise SpecError(f"{where}: {key}={value!r}: give a string, a number, or true / false")
    return out


def _checked(argv: list[str], where: str) -> list[str]:
    """`argv` after the fastse command line has parsed it (names, types, choices), without running it."""
    import click
    from fastse.cli.main import main as cli

    command = cli.commands[argv[0]]
    try:
        command.make_context(argv[0], list(argv[1:]))
    except click.ClickException as e:
        raise SpecError(f"{where}: fastse {argv[0]} refuses its flags: {e.format_message()}") from None
    return argv


# ------------------------------------------------------------------------------------------- run


def say(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


def start(job: Job, gpu: str | None, logs: Path) -> subprocess.Popen:
    """Start `job` in a process group of its own (on GPU `gpu`), its output appended to its log."""
    # -P: the installed fastse, not the checkout's fastse/ (no cli/ there) through the working directory
    argv = [sys.executable, "-P", "-m", "fastse.cli.main", *job.argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(logs / f"{job.name}.log", "a") as log:
        log.write(f"\n# {datetime.now().isoformat(timespec='seconds')}"
                  f"{f' CUDA_VISIBLE_DEVICES={gpu}' if gpu is not None else ''}: {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
    say(f"start {job.name} ({job.state()}){f' on GPU {gpu}' if gpu is not None else ''}: fastse {shlex.join(job.argv)}")
    return proc


def stop(procs: list[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM the process groups of `procs`, SIGKILL what is left after `grace` seconds."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL)
            proc.wait()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def job_slots(gpus: str | None, per_gpu: int = 1) -> list[str | None]:
    """The GPU of each job slot for --gpus `gpus` (\"0,1\") and --jobs-per-gpu `per_gpu`, GPUs taken in
    turn (0,1,0,1) so that the first jobs spread over all GPUs; [None] without --gpus."""
    ids = [g.strip() for g in gpus.split(",")] if gpus else [None]
    if gpus and (not all(ids) or len(set(ids)) < len(ids)):
        raise SpecError(f"--gpus={gpus}: give distinct ids, e.g. 0,1,2,3")
    if per_gpu < 1 or (per_gpu > 1 and not gpus):
        raise SpecError(f"--jobs-per-gpu={per_gpu}: give K >= 1, and --gpus with K > 1")
    return [g for _ in range(per_gpu) for g in ids]


def run_jobs(jobs: list[Job], *, gpus: list[str | None], budget: float | None, logs: Path) -> int:
    """Run the jobs not yet done (see the module docstring); the exit status. `gpus`: one entry per job
    slot (a GPU id, repeated for several jobs on it), or [None]: one job at a time, CUDA_VISIBLE_DEVICES as is."""
    stopped: list[str] = []
    handler = lambda signum, frame: stopped.append(signal.Signals(signum).name)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(jobs, gpus, budget, logs, stopped)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(jobs: list[Job], gpus: list[str | None], budget: float | None, logs: Path, stopped: list[str]) -> int:
    deadline = time.monotonic() + budget if budget else None
    pending = [j for j in jobs if not j.done()]
    ids = list(dict.fromkeys(gpus))
    each = f" ({len(gpus) // len(ids)} jobs each)" if len(gpus) > len(ids) else ""
    say(f"{len(jobs) - len(pending)} of {len(jobs)} jobs done; {len(pending)} to run on "
        f"{'GPUs ' + ','.join(ids) + each if ids[0] is not None else 'this machine, one at a time'}"
        + (f", time budget {budget:g} s" if budget else ""))
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}  # by slot: an index into gpus
    failed: list[Job] = []
    while pending or running:
        if deadline is not None and time.monotonic() >= deadline and not stopped:
            stopped.append(f"the time budget of {budget:g} s")
        if stopped:
            say(f"stopping at {stopped[0]}: killing {', '.join(j.name for j, _, _ in running.values()) or 'nothing'}")
            stop([p for _, p, _ in running.values()])
            break
        for slot, (job, proc, began) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[slot]
            if proc.returncode == 0 and job.done():
                figures = load_run(job.folder).values() if job.command != "eval-linear" else {}
                say(f"done {job.name} in {time.monotonic() - began:.0f} s"
                    + "".join(f", {k} {v:.2f}" for k, v in figures.items()))
            else:
                failed.append(job)
                why = f"exited {proc.returncode}" if proc.returncode else "exited 0 but is not finished"
                tail = (logs / f"{job.name}.log").read_text().splitlines()[-15:]
                say(f"FAILED {job.name}: {why}; the end of {logs / (job.name + '.log')}:\n    " + "\n    ".join(tail))
        for job in [j for j in pending if j.after in failed]:
            pending.remove(job)
            failed.append(job)
            say(f"skip {job.name}: {job.after.name} failed")
        for slot in [i for i in range(len(gpus)) if i not in running]:
            ready = next((j for j in pending if j.after is None or j.after.done()), None)
            if ready is None:
                break
            pending.remove(ready)
            running[slot] = (ready, start(ready, gpus[slot], logs), time.monotonic())
        if not running and pending:  # everything left waits on runs that did not finish
            failed += pending
            say(f"cannot run {', '.join(j.name for j in pending)}: what they evaluate is not finished")
            break
        time.sleep(0.2)
    left = [j for j in jobs if not j.done()]
    say(f"{len(jobs) - len(left)} of {len(jobs)} jobs done" + (f"; left: {', '.join(j.name for j in left)}" if left
                                                              else ""))
    return FAILED if failed else STOPPED if left else 0


def report(out: Path, jobs: list[Job], title: str) -> None:
    folders = []
    for job in jobs:
        if job.command != "eval-linear" and (job.folder / "metrics.jsonl").is_file():
            folders.append(job.folder)
    if not folders:
        return
    try:
        path, text = write_report(folders, out / "report", title=title)
    except ReportError as e:
        say(f"no report: {e}")
        return
    print(text, flush=True)
    say(f"report: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", type=Path, help="the study's spec file (.toml or .json)")
    ap.add_argument("--data", help="--data of every command, instead of the spec's")
    ap.add_argument("--gpus", help="comma-separated GPU ids: one job on each at a time [default: one job at a time, "
                    "CUDA_VISIBLE_DEVICES as it is]")
    ap.add_argument("--jobs-per-gpu", type=int, default=1, metavar="K",
                    help="with --gpus: run K jobs at a time on each GPU [default: 1]")
    ap.add_argument("--time-budget", type=float, help="seconds: kill the running jobs then (they resume next time)")
    ap.add_argument("--dry-run", action="store_true", help="list the jobs, their state and commands; run nothing")
    args = ap.parse_args()
    try:
        if args.time_budget is not None and not args.time_budget > 0:
            raise SpecError(f"--time-budget={args.time_budget} must be > 0")
        gpus = job_slots(args.gpus, args.jobs_per_gpu)
        out, jobs = load_spec(args.spec, args.data)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(BAD_SPEC)
    if args.dry_run:
        for job in jobs:
            print(f"{job.name:40s} {job.state():24s} fastse {shlex.join(job.argv)}")
        return
    (out / "logs").mkdir(parents=True, exist_ok=True)
    lock = open(out / ".study.lock", "w")  # held until exit: one study.py per out folder
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"error: another study.py is running on {out}", file=sys.stderr)
        sys.exit(BAD_SPEC)
    status = run_jobs(jobs, gpus=gpus, budget=args.time_budget, logs=out / "logs")
    report(out, jobs, title=f"Study {args.spec.stem}")
    sys.exit(status)


if __name__ == "__main__":
    main()
