"""Fault injection: each fault of issue 8 injected into real tiny training runs (CIFAR-10 JPEGs, ResNet-18
at 16 px), then recovery checked. Crashes: kill -9 at random moments and inside checkpoint writes, then
`--resume` until done, bit-identical to an uninterrupted run; torn and corrupt checkpoints. Data: corrupt,
truncated, unsupported, converted and missing images. Input: impossible flags, unwritable or full output
folders, resuming another method's run: exit 2 before any GPU work. Numerics: NaN or Inf losses and a
poisoned teacher stop the run, naming the step, with the last good checkpoint kept; a full disk during a
write. Distributed (2 processes): a rank that raises, bad data on one rank, diverged teachers, a rank
killed under torchrun. `fastse semi` (FixMatch, WRN-10-1): kill -9 and resume, NaN / Inf losses, a full
disk, impossible flags, more labels than images, resuming another run's settings, a rank that raises.
Pytest's report ends with a table: faults injected, runs recovered, checkpoints lost, hangs.

CPU (CI): gloo. `FASTSE_FAULT_DEVICE=cuda` runs the same faults on the GPU (nccl, two GPUs for the
distributed ones) for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fastse.cli.main import main

from fastse import checkpoints as ckpt
from fastse.checkpoints import CheckpointError, check_run_dir, latest_checkpoint, load_checkpoint
from fastse.engine import launch as ddp
from fastse.pretrain import trainer as trainer_module
from fastse.pretrain.config import PretrainConfig
from fastse.pretrain.trainer import Trainer, TrainingError
from fastse.semi import trainer as semi_module
from fastse.semi.config import SemiConfig
from fastse.semi.trainer import SemiTrainer

DEVICE = os.environ.get("FASTSE_FAULT_DEVICE", "cpu")
REPO = Path(__file__).resolve().parents[1]
HANG_S = 180  # a process still running this long after its fault (or its start) is counted as a hang
ALL_RANKS_END_S = 30  # every rank must end this soon after one raises (a failed rank ends itself after 15 s)


# ------------------------------------------------------------------------------------------ the table


class FaultTable:
    """Rows of (fault, injected, recovered, checkpoints lost, hangs, outcome), printed by pytest's
    terminal summary; a fault is recorded before the test asserts on it, so failures show too."""

    def __init__(self) -> None:
        self.rows: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0, ""])

    def add(self, fault: str, injected: int, recovered: int, *, lost: int = 0, hangs: int = 0,
            outcome: str = "") -> None:
        row = self.rows[fault]
        for i, n in enumerate((injected, recovered, lost, hangs)):
            row[i] += n
        row[4] = outcome or row[4]

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        width = max(len(f) for f in self.rows)
        head = f"{'fault':<{width}}  injected  recovered  ckpts lost  hangs  outcome"
        lines = [head, "-" * len(head)]
        for fault, (inj, rec, lost, hangs, outcome) in self.rows.items():
            if not inj:
                outcome = "NOT REACHED: the test failed before injecting it"
            elif rec < inj or lost or hangs:
                outcome = f"FAILED: {inj - rec} not recovered (see the failing test); expected: {outcome}"
            lines.append(f"{fault:<{width}}  {inj:>8}  {rec:>9}  {lost:>10}  {hangs:>5}  {outcome}")
        totals = [sum(r[i] for r in self.rows.values()) for i in range(4)]
        lines.append(f"{'total':<{width}}  {totals[0]:>8}  {totals[1]:>9}  {totals[2]:>10}  {totals[3]:>5}")
        where = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}, nccl" if DEVICE == "cuda"
                 else f"{os.cpu_count()} CPU cores, gloo")
        terminalreporter.write_sep("=", f"fault injection on {DEVICE} ({where}; torch {torch.__version__})")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def faults(request) -> FaultTable:
    table = FaultTable()
    request.config.pluginmanager.register(table, "fastse-fault-table")
    return table


# ------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def data(cifar_subset) -> Path:
    """8 train and 4 test real CIFAR-10 JPEGs of each class: 5 steps an epoch at batch 16."""
    return cifar_subset(8, 4)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`fastse pretrain` of a deterministic 20-step MoCo v2 run (4 epochs of 5 steps, a checkpoint each)."""
    return ["pretrain", "--preset", "mocov2-cifar10", "--data", str(data), "--image-size", "16", "--batch-size", "16",
            "--epochs", "4", "--queue-size", "32", "--log-every", "1", "--ckpt-every", "1", "--knn-every", "0",
            "--deterministic", "--no-compile", "--device", DEVICE, "--wandb", "disabled",
            "--cache-dir", str(out.parent / "cache"), "--out", str(out), *extra]


def small(data: Path, out: Path, **changes) -> PretrainConfig:
    """A 15-step in-process BYOL run (3 epochs of 5 steps), a checkpoint every epoch, narrow heads."""
    base = dict(arch="resnet18", cifar_stem=True, data=str(data), dataset="cifar10", image_size=16, epochs=3,
                batch_size=16, proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64, queue_size=32, log_every=100,
                knn_every=0, ckpt_every=1, keep_ckpts=3, out=str(out), wandb="disabled", device=DEVICE,
                compile=False, cache_dir=str(out.parent / "cache"))
    return PretrainConfig(**{**base, **changes})


def spawn(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """A subprocess in the repository root, stdout and stderr into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def wait(proc: subprocess.Popen, timeout: float = HANG_S) -> bool:
    """True if `proc` ended within `timeout` s; else it is killed (a hang) and False."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def state(run: Path) -> tuple[dict, dict]:
    """(groups, meta) of the newest complete checkpoint of `run`, checksums verified."""
    return load_checkpoint(latest_checkpoint(run))


def differences(a: Path, b: Path) -> list[str]:
    """What differs between the newest checkpoints of runs `a` and `b` (tensors bit for bit)."""
    (ga, ma), (gb, mb) = state(a), state(b)
    out = [k for k in ("step", "smoother", "optimizer_layout") if ma[k] != mb[k]]
    for group in sorted(ga.keys() | gb.keys()):
        keys = ga.get(group, {}).keys() | gb.get(group, {}).keys()
        out += [f"{group}.{k}" for k in sorted(keys) if k not in ga.get(group, {}) or k not in gb.get(group, {})
                or not torch.equal(ga[group][k], gb[group][k])]
    return out


def uninterrupted(folder: Path, args) -> Path:
    """`folder`/run of `fastse` with `args(run)`, uninterrupted (a subprocess, like the interrupted runs)."""
    out = folder / "run"
    proc = spawn(["-m", "fastse.cli.main", *args(out)], folder / "log.txt")
    assert wait(proc) and proc.returncode == 0, (folder / "log.txt").read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run of `cli_args`."""
    return uninterrupted(tmp_path_factory.mktemp("reference"), lambda out: cli_args(data, out, "--resume"))


# --------------------------------------------------------------------------------------------- crashes


def _kill_when(proc: subprocess.Popen, ready, deadline: float) -> str:
    """SIGKILL `proc` once `ready()` holds: 'killed', or 'exited' if it ended first, or 'hang'."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    return "hang"


def _steps(log: Path) -> int:
    """Progress lines ("... | step 7/20 | ...") in `log` so far."""
    return len(re.findall(r"\| step \d+/", log.read_text()))


def _logged_steps(run: Path) -> list[int]:
    """The steps of the metrics lines (those with a loss) in `run`'s metrics.jsonl, in file order."""
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [m["step"] for m in lines if "loss" in m]


def _temp_folders(run: Path) -> set[str]:
    folder = run / "checkpoints"
    return {p.name for p in folder.iterdir() if p.name.startswith(".tmp-")} if folder.is_dir() else set()


def _after(log: Path, steps: int, fraction: float):
    """A `ready` for `_kill_when`: true `fraction` of a step after `log` shows `steps` progress lines, the
    step's length read between the lines `steps - 1` and `steps`: a random moment of the next step
    whether steps take 100 ms (CPU) or 2 ms (GPU), so a kill never drifts many steps further."""
    seen: list[float] = []
    due: list[float] = []

    def ready() -> bool:
        if not due:
            done, now = _steps(log), time.monotonic()
            if done >= steps - 1 and not seen:
                seen.append(now)
            if done >= steps:
                due.append(now + fraction * (now - seen[0]))
        return bool(due) and time.monotonic() >= due[0]

    return ready


def _new_temp_folder(run: Path, before: set[str]):
    """A `ready` for `_kill_when`: true once a checkpoint temp folder not in `before` exists."""
    return lambda: bool(_temp_folders(run) - before)


def _outside_writes(run: Path, before: set[str], ready):
    """`ready`, held back while a checkpoint write of this attempt is under way: on a GPU the tiny run's
    steps take milliseconds and its writes most of the time, so a plain random moment nearly always lands
    inside a write (the other row)."""
    return lambda: ready() and not _temp_folders(run) - before


def test_kill_9_at_random_moments_and_inside_checkpoint_writes_then_resume(data, reference, tmp_path, faults):
    """Each attempt runs the same `--resume` command (20 steps, a checkpoint every 5) and is killed either
    at a random moment of the step after a random 6-9 more steps (past one checkpoint, mid-epoch; outside a
    write), or the moment a checkpoint
    write begins (with an older checkpoint complete). After every kill the newest complete checkpoint
    must load and be no older than before; the fifth attempt resumes from step 10, runs to the end and
    must be bit-identical to the uninterrupted reference, its metrics.jsonl holding each step's line once."""
    rng = random.Random(8)
    out = tmp_path / "run"
    newest, lost, hangs, inside, elsewhere, attempt = -1, 0, 0, 0, 0, 0
    while True:
        log, before = tmp_path / f"attempt{attempt}.txt", _temp_folders(out)
        proc = spawn(["-m", "fastse.cli.main", *cli_args(data, out, "--resume")], log)
        if attempt == 4:
            result = "exited" if wait(proc) else "hang"
        else:  # odd attempts: the moment a checkpoint write has begun
            ready = (_new_temp_folder(out, before) if attempt % 2 else
                     _outside_writes(out, before, _after(log, rng.randint(6, 9), rng.random())))
            result = _kill_when(proc, ready, time.monotonic() + HANG_S)
        attempt += 1
        if result != "killed":
            hangs += result == "hang"
            break
        torn = bool(_temp_folders(out) - before)  # the kill left a half-written checkpoint
        inside, elsewhere = inside + torn, elsewhere + (not torn)
        latest = latest_checkpoint(out) if out.is_dir() else None
        step = -1 if latest is None else load_checkpoint(latest)[1]["step"]  # checksums verified
        lost += step < newest
        newest = max(newest, step)
    finished = proc.returncode == 0 and not hangs and "resumed at step 10" in log.read_text()
    same = finished and not differences(reference, out)
    logged = _logged_steps(out) == list(range(1, 21))  # the lines a killed attempt wrote after its checkpoint: gone
    ok = same and not lost and logged
    faults.add("kill -9 inside a checkpoint write, --resume", inside, inside * ok, lost=lost, hangs=hangs,
               outcome="resumed from the newest complete checkpoint; bit-identical")
    faults.add("kill -9 at a random moment, --resume", elsewhere, elsewhere * ok, hangs=hangs,
               outcome="resumed from the newest complete checkpoint; bit-identical")
    assert finished, log.read_text()[-3000:]
    assert inside >= 1 and elsewhere >= 1, (inside, elsewhere)
    assert lost == 0
    assert same, differences(reference, out)[:5]
    assert logged, _logged_steps(out)


def test_resume_passes_over_corrupt_and_truncated_checkpoints(data, reference, tmp_path, faults):
    """The reference's checkpoints (steps 10, 15, 20) copied; a byte of step 20 flipped and step 15 cut
    short: `--resume` verifies the checksums, starts from step 10 and ends bit-identical."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    newest, second = sorted((out / "checkpoints").glob("step-*"))[-1:-3:-1]
    teacher = bytearray((newest / "teacher.safetensors").read_bytes())
    teacher[len(teacher) // 2] ^= 0x10
    (newest / "teacher.safetensors").write_bytes(bytes(teacher))
    student = second / "student.safetensors"
    student.write_bytes(student.read_bytes()[: student.stat().st_size // 3])
    result = CliRunner().invoke(main, cli_args(data, out, "--resume"))
    resumed = result.exit_code == 0 and "resumed at step 10" in result.output
    same = resumed and not differences(reference, out)
    faults.add("corrupt or truncated checkpoint file, --resume", 2, 2 * same,
               outcome="checksums fail; resumed from the one before; bit-identical")
    assert resumed, result.output[-3000:]
    assert same


def test_no_complete_checkpoint_is_never_silently_restarted(tmp_path, data, faults):
    out = tmp_path / "run"
    ckpt.save_checkpoint(out, 5, {"student": {"w": torch.zeros(3)}}, {})
    (out / "checkpoints" / "step-000000005" / "student.safetensors").write_bytes(b"torn")
    result = CliRunner().invoke(main, cli_args(data, out, "--resume"))
    refused = result.exit_code == 2 and "none of its checkpoints is complete" in result.output
    faults.add("every checkpoint torn, --resume", 1, refused, outcome="exit 2: refuses to start afresh over them")
    assert refused, result.output


# ------------------------------------------------------------------------------------------------ data


def _damaged_copy(data: Path, root: Path, fault: str) -> tuple[Path, str]:
    """A copy of `data` with one fault; returns (root, what a check must print about it)."""
    shutil.copytree(data, root)
    cat = root / "train" / "cat"
    real = sorted(cat.iterdir())[0]
    if fault == "corrupt":
        (cat / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 4)
        return root, "bad.jpg"
    if fault == "truncated":
        (cat / "cut.jpg").write_bytes(real.read_bytes()[:300])
        return root, "cut.jpg"
    if fault == "unsupported":
        (cat / "photo.bmp").write_bytes(b"BM" + bytes(64))
        return root, "photo.bmp"
    if fault == "empty class":
        (root / "train" / "zebra").mkdir()
        (root / "train" / "zebra" / "notes.txt").write_text("no images here")
        return root, "zebra"
    if fault == "class mismatch":  # test/ lacks a class of train/
        shutil.rmtree(root / "test" / "cat")
        return root, "missing ['cat']"
    raise ValueError(fault)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built anywhere but on the meta device (the checkpoint size estimate)."""
    real = trainer_module.build_method

    def meta_only(config):
        method = real(config)
        if next(method.parameters()).device.type != "meta":
            pytest.fail("a model was built")
        return method

    monkeypatch.setattr(trainer_module, "build_method", meta_only)


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "unsupported", "empty class", "class mismatch"])
def test_bad_data_is_named_by_data_check_and_refused_before_training(data, tmp_path, fault, faults, no_model):
    root, name = _damaged_copy(data, tmp_path / "data", fault)
    check = CliRunner().invoke(main, ["data", "check", str(root)])
    out = tmp_path / "run"
    run = CliRunner().invoke(main, cli_args(root, out))
    named = check.exit_code == 2 and name in check.output
    refused = named and run.exit_code == 2 and name in run.output
    faults.add(f"data: {fault}", 1, refused and not (out / "checkpoints").exists(),
               outcome="shown by data check; pretrain names it: exit 2 before any model")
    assert named, check.output
    assert run.exit_code == 2 and name in run.output, run.output
    assert not (out / "checkpoints").exists()


def test_gray_png_and_stray_files_are_converted_counted_and_trained_on(data, tmp_path, faults):
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(data, root)
    cat = root / "train" / "cat"
    first, second = sorted(cat.iterdir())[:2]
    Image.open(first).convert("L").save(first, format="JPEG")  # gray JPEG
    Image.open(second).save(second, format="PNG")  # a PNG named .jpg
    (cat / "README.txt").write_text("stray")
    check = CliRunner().invoke(main, ["data", "check", str(root)])
    ok = check.exit_code == 0 and "png 1, gray 1" in check.output and "ignored 1 non-image" in check.output
    out = tmp_path / "run"
    trainer = Trainer(small(root, out, epochs=1, max_steps=2))
    result = trainer.fit()
    faults.add("data: gray / PNG-as-JPEG / stray file", 3, 3 * (ok and result["step"] == 2),
               outcome="converted to RGB or ignored, counted, trained on")
    assert ok, check.output
    assert result["step"] == 2 and latest_checkpoint(out) is not None


# ----------------------------------------------------------------------------------------------- input


@pytest.fixture
def no_gpu_work(monkeypatch):
    """Fail the test if the process group would be joined or a device touched (init_distributed)."""
    monkeypatch.setattr(ddp, "init_distributed", lambda *a, **k: pytest.fail("reached init_distributed"))


def _refused(faults, fault: str, args: list[str], message: str, out: Path | None,
             outcome: str = "one-line error, exit 2, before any GPU work") -> None:
    """`fastse` with `args` must exit 2 with `message` on its error line (and no checkpoint in `out`)."""
    result = CliRunner().invoke(main, args)
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    ok = result.exit_code == 2 and len(error) == 1 and message in error[0] and "Traceback" not in result.output
    ok = ok and (out is None or not (out / "checkpoints").exists())
    faults.add(f"input: {fault}", 1, ok, outcome=outcome)
    assert result.exit_code == 2, result.output
    assert len(error) == 1 and message in error[0] and "Traceback" not in result.output, result.output
    assert out is None or not (out / "checkpoints").exists()


@pytest.mark.parametrize("fault,extra,message", [
    ("keep_prob outside [0, 1]", ["--keep-prob", "1.5"], "--keep-prob=1.5 is outside [0, 1]"),
    ("keep_prob outside [0, 1]", ["--keep-prob", "-0.1"], "--keep-prob=-0.1 is outside [0, 1]"),
    ("unknown architecture", ["--arch", "vit_b_16"], "Invalid value for '--arch'"),
    ("unknown method", ["--method", "simclr"], "Invalid value for '--method'"),
    ("unknown teacher rule", ["--smoothing", "swa"], "Invalid value for '--rule' / '--smoothing'"),
])
def test_impossible_flags_exit_2(data, tmp_path, fault, extra, message, faults, no_gpu_work):
    out = tmp_path / "run"
    _refused(faults, fault, cli_args(data, out, *extra), message, out)


def test_batch_not_divisible_by_the_world_size_exits_2(data, tmp_path, faults, monkeypatch, no_gpu_work):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would set it, before any process group
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "run"
    _refused(faults, "batch size not divisible by the world size", cli_args(data, out),
             "--batch-size=16 is not divisible by the 3 processes", out)


@pytest.mark.parametrize("where", ["under a file", "is a file"])
def test_unwritable_output_folder_exits_2(data, tmp_path, where, faults, no_gpu_work):
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    out = blocker / "run" if where == "under a file" else blocker
    _refused(faults, "output folder not writable", cli_args(data, out), "the run folder cannot be written", out)


def test_disk_too_full_for_one_checkpoint_exits_2(data, tmp_path, faults, monkeypatch, no_gpu_work):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50 << 20))
    out = tmp_path / "run"
    _refused(faults, "disk too full for one checkpoint", cli_args(data, out), "50 MiB free on its disk, but one "
             "checkpoint needs about", out)


def test_room_for_fewer_checkpoints_than_kept_warns(tmp_path, monkeypatch, caplog):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=250))
    check_run_dir(tmp_path / "run", 100, keep=3)  # 2 of the 4 needed fit
    assert "holds 2 checkpoints" in caplog.text and "keeping 3 needs 4 more" in caplog.text
    with pytest.raises(CheckpointError, match="one checkpoint needs"):
        check_run_dir(tmp_path / "run", 300)
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # the probe file is gone


def test_room_check_counts_best_where_a_monitor_keeps_one(tmp_path, monkeypatch, caplog):
    from fastse.engine import runs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=450))
    check_run_dir(tmp_path / "run", 100, keep=3)  # the 4 needed fit
    assert "needs" not in caplog.text
    check_run_dir(tmp_path / "run", 100, keep=3, best=True)  # best/ besides: 5
    assert "holds 4 checkpoints" in caplog.text and "keeping 3 and best/ needs 5 more" in caplog.text
    caplog.clear()
    (tmp_path / "run" / ckpt.BEST).mkdir()  # a best/ there already counts
    check_run_dir(tmp_path / "run", 100, keep=3, best=True)
    assert "needs" not in caplog.text
    seen = []

    def check(out, size, keep, best):
        out.mkdir()
        seen.append((size, keep, best))

    monkeypatch.setattr(ckpt, "check_run_dir", check)
    for monitor, best in (("teacher_acc", True), ("none", False)):
        config = SemiConfig(data="cifar10", out=str(tmp_path / monitor), monitor=monitor, keep_ckpts=2, device="cpu")
        runs.preflight(config, resume=False, fixed=(), checkpoint_bytes=lambda c: 7)[2].release()
        assert seen[-1] == (7, 2, best)
    config = PretrainConfig(data="cifar10", out=str(tmp_path / "pretrain"), device="cpu")  # monitor knn_top1
    runs.preflight(config, resume=False, fixed=(), checkpoint_bytes=lambda c: 7)[2].release()
    assert seen[-1] == (7, config.keep_ckpts, True)


def test_resume_of_another_methods_run_exits_2(data, reference, faults, no_gpu_work):
    args = cli_args(data, reference, "--resume")
    args[args.index("mocov2-cifar10")] = "byol-cifar10"
    args[args.index("--queue-size"):args.index("--queue-size") + 2] = []
    before = sorted(p.name for p in (reference / "checkpoints").iterdir())
    _refused(faults, "--resume of another method's run", args, "holds a run with --method='mocov2'", None)
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == before


# -------------------------------------------------------------------------------------------- numerics


def _kept(run: Path, step: int) -> bool:
    """The newest complete checkpoint of `run` is that of `step`, loads, and holds only finite values."""
    latest = latest_checkpoint(run)
    if latest is None or int(latest.name.split("-")[1]) != step:
        return False
    groups, _ = load_checkpoint(latest)
    return all(t.isfinite().all() for g in groups.values() for t in g.values() if t.is_floating_point())


@pytest.mark.parametrize("bad,at,log_every,message", [
    ("nan", 7, 100, "the loss is not finite from step 7 on (found at step 10)"),  # between log lines: the save checks
    ("inf", 12, 4, "the loss is not finite from step 12 on (found at step 12)"),  # at a log line
])
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, bad, at, log_every,
                                                                                  message, faults):
    out = tmp_path / "run"
    trainer = Trainer(small(data, out, log_every=log_every))
    real = trainer.method.forward
    trainer.method.forward = lambda views: real(views) * (float(bad) if trainer.step + 1 == at else 1.0)
    with pytest.raises(TrainingError) as stopped:
        trainer.fit()
    kept = _kept(out, 10 if at > 10 else 5)
    named = message in str(stopped.value) and "the newest checkpoint stays" in str(stopped.value)
    faults.add(f"{'NaN' if bad == 'nan' else 'Inf'} loss {'between log lines' if log_every > 10 else 'at a log line'}",
               1, named and kept,
               lost=not kept, outcome="stopped naming the step; last good checkpoint kept, no poisoned one")
    assert named, str(stopped.value)
    assert kept and not (out / "backbone.safetensors").exists()


def test_poisoned_teacher_with_finite_losses_is_never_saved(data, tmp_path, faults):
    out = tmp_path / "run"
    trainer = Trainer(small(data, out))
    real = trainer.smoother.step

    def step(**kw):
        real(**kw)
        if trainer.step + 1 == 10:  # the last step before the epoch-2 checkpoint
            with torch.no_grad():
                trainer.method.teacher.backbone.layer3[0].conv1.weight[0, 0, 0, 0] = float("nan")

    trainer.smoother.step = step
    with pytest.raises(TrainingError) as stopped:
        trainer.fit()
    named = "step 10: the checkpoint holds non-finite values (teacher.backbone.layer3.0.conv1.weight)" in str(
        stopped.value)
    kept = _kept(out, 5)
    faults.add("NaN in the teacher, finite losses", 1, named and kept, lost=not kept,
               outcome="stopped before the save, naming the tensor; last good checkpoint kept")
    assert named, str(stopped.value)
    assert kept


@pytest.mark.parametrize("kind", ["pretrain", "semi"])
def test_full_disk_during_a_checkpoint_write_keeps_the_last_one(data, tmp_path, faults, monkeypatch, kind):
    out = tmp_path / "run"
    trainer = Trainer(small(data, out)) if kind == "pretrain" else SemiTrainer(semi_small(data, out, max_steps=10))
    real = ckpt._write_synced

    def write(path: Path, payload: bytes) -> None:  # the disk fills up in the middle of the step-10 checkpoint
        if path.parent.name.startswith(".tmp-step-000000010") and path.name == "teacher.safetensors":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, payload)

    monkeypatch.setattr(ckpt, "_write_synced", write)
    with pytest.raises(TrainingError) as stopped:
        trainer.fit()
    named = "step 10: the checkpoint could not be written" in str(stopped.value) and "No space left" in str(
        stopped.value)
    kept = _kept(out, 5) and not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    faults.add(f"{'semi: ' * (kind == 'semi')}disk full during a checkpoint write", 1, named and kept, lost=not kept,
               outcome="stopped naming the step; half-written folder removed, last one kept")
    assert named, str(stopped.value)
    assert kept


# ----------------------------------------------------------------------------------------- distributed

_RANK = """
import json, sys, time, torch
import fastse.pipelines.datasets as datasets
from fastse.pretrain.config import PretrainConfig
from fastse.pretrain.trainer import Trainer
config, fault = PretrainConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2])
scan = datasets.scan_image_folder
def timed_scan(*args, **kwargs):  # when the data check fails
    try:
        return scan(*args, **kwargs)
    except datasets.DataError:
        print(f"FAULT {time.time()}", flush=True)
        raise
datasets.scan_image_folder = timed_scan
trainer = Trainer(config)
real = trainer.train_step
def step(views):
    if trainer.env.rank == fault.get("rank") and trainer.step + 1 == fault.get("step"):
        print(f"FAULT {time.time()}", flush=True)
        if fault["kind"] == "raise":
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        with torch.no_grad():  # another teacher on this rank only
            p = next(trainer.method.teacher.parameters())
            p[(0,) * p.ndim] += 1e-3
    return real(views)
trainer.train_step = step
trainer.fit()
"""


def _two_ranks(config: PretrainConfig | SemiConfig, fault: dict, logs: Path, script: str = _RANK
               ) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two processes of `script` (a process group of 2 over gloo, or nccl on 2 GPUs) running `config`
    with `fault` injected; their outputs go to `logs`/rank0.txt and rank1.txt."""
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, files = [], []
    for rank in range(2):
        files.append(logs / f"rank{rank}.txt")
        procs.append(spawn(["-c", script, json.dumps(config.to_dict()), json.dumps(fault)], files[-1], RANK=str(rank),
                           LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS="1"))
    return procs, files


def _fault_time(log: Path) -> float:
    """time.time() at which the worker writing `log` injected or met its fault."""
    return float(re.search(r"FAULT ([\d.]+)", log.read_text()).group(1))


def _ended(procs: list[subprocess.Popen]) -> tuple[list[float], int]:
    """(time.time() at which each process ended, hangs)."""
    ends, hangs = [0.0] * len(procs), 0
    deadline = time.monotonic() + HANG_S
    while not all(ends) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if not ends[i] and p.poll() is not None:
                ends[i] = time.time()
        time.sleep(0.02)
    for i, p in enumerate(procs):
        if not ends[i]:
            p.kill()
            p.wait()
            hangs += 1
    return ends, hangs


@pytest.mark.parametrize("kind", ["pretrain", "semi"])
def test_an_exception_in_one_rank_ends_all_ranks_within_seconds(data, tmp_path, faults, kind):
    if kind == "pretrain":
        procs, logs = _two_ranks(small(data, tmp_path / "run"), {"kind": "raise", "rank": 1, "step": 3}, tmp_path)
    else:
        procs, logs = _two_ranks(semi_small(data, tmp_path / "run"), {"rank": 1, "step": 3}, tmp_path,
                                 script=_SEMI_RANK)
    ends, hangs = _ended(procs)
    text = [f.read_text() for f in logs]
    seconds = max(ends) - _fault_time(logs[1])
    heard = "[rank 0] stopping: rank 1 failed: OutOfMemoryError: CUDA out of memory (injected)" in text[0]
    ok = not hangs and all(p.returncode != 0 for p in procs) and seconds < ALL_RANKS_END_S and heard
    faults.add(f"{'semi: ' if kind == 'semi' else ''}exception in one rank (OOM) mid-training", 1, ok, hangs=hangs,
               outcome=f"all ranks ended {seconds:.1f} s after it; the others name it")
    assert not hangs and seconds < ALL_RANKS_END_S, text
    assert heard and "OutOfMemoryError" in text[1], text


def test_bad_data_in_rank_0_ends_rank_1_waiting_at_a_barrier(data, tmp_path, faults):
    root, _ = _damaged_copy(data, tmp_path / "data", "truncated")
    procs, logs = _two_ranks(small(root, tmp_path / "run"), {}, tmp_path)
    ends, hangs = _ended(procs)
    text = [f.read_text() for f in logs]
    seconds = max(ends) - _fault_time(logs[0])
    heard = "[rank 1] stopping: rank 0 failed: DataError: 1 corrupt or truncated image(s)" in text[1]
    ok = not hangs and heard and "cut.jpg" in text[0] and seconds < ALL_RANKS_END_S
    faults.add("bad data in one rank (others at a barrier)", 1, ok, hangs=hangs,
               outcome=f"all ranks ended {seconds:.1f} s after it; the others name it")
    assert not hangs and heard and seconds < ALL_RANKS_END_S, text
    assert "cut.jpg" in text[0], text[0]


def test_diverged_teachers_stop_both_ranks_before_the_next_checkpoint(data, tmp_path, faults):
    out = tmp_path / "run"
    procs, logs = _two_ranks(small(data, out), {"kind": "diverge", "rank": 1, "step": 7}, tmp_path)
    ends, hangs = _ended(procs)
    text = [f.read_text() for f in logs]
    named = all("step 10: the teacher differs between ranks" in t for t in text)
    kept = _kept(out, 5)
    faults.add("diverged teachers (rank 1 perturbed)", 1, named and kept and not hangs, lost=not kept, hangs=hangs,
               outcome="both ranks stop at the next check naming the step; nothing diverged saved")
    assert not hangs and named, text
    assert kept


def _worker_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (read from /proc), or None."""
    for children in Path(f"/proc/{launcher.pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    return int(pid)
            except OSError:
                continue
    return None


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_torchrun_worker_killed_ends_the_run_and_resume_completes(data, tmp_path, faults):
    """torchrun, 2 processes, global batch 32 (2 steps an epoch, a checkpoint each): rank 1 is killed
    with SIGKILL after step 5; torchrun must end rank 0 and exit within seconds, and the same command
    then resumes from the newest checkpoint and finishes."""
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastse.cli.main",
            *cli_args(data, out, "--resume")]
    args[args.index("--batch-size") + 1] = "32"
    log = tmp_path / "first.txt"
    launcher = spawn(args, log, OMP_NUM_THREADS="1")
    deadline, killed_at, survivor = time.monotonic() + HANG_S, None, None
    while killed_at is None and launcher.poll() is None and time.monotonic() < deadline:
        if _steps(log) >= 5 and (victim := _worker_pid(launcher, 1)):
            survivor = _worker_pid(launcher, 0)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(0.01)
    ended = wait(launcher, timeout=60)
    seconds = time.monotonic() - killed_at if killed_at else float("nan")
    latest = latest_checkpoint(out)
    step = load_checkpoint(latest)[1]["step"] if latest else -1
    resumed = spawn(args, tmp_path / "second.txt", OMP_NUM_THREADS="1")
    finished = wait(resumed)
    text = (tmp_path / "second.txt").read_text()
    ok = ended and launcher.returncode != 0 and finished and resumed.returncode == 0
    ok = ok and f"resumed at step {step}" in text
    faults.add("kill -9 of a rank under torchrun, then --resume", 1, ok and step >= 4, lost=step < 4,
               hangs=(not ended) + (not finished), outcome=f"torchrun ended all ranks {seconds:.1f} s after; resumed")
    assert killed_at is not None, log.read_text()[-3000:]
    assert ended and launcher.returncode != 0 and seconds < ALL_RANKS_END_S, log.read_text()[-3000:]
    assert survivor is not None and not _running(survivor)  # torchrun ended rank 0 too
    assert step >= 4  # the checkpoints of epochs 1 and 2 (steps 2, 4) were complete before the kill
    assert finished and resumed.returncode == 0 and f"resumed at step {step}" in text, text[-3000:]
    assert state(out)[1]["step"] == 8


# ------------------------------------------------------------------------------ fastse semi (FixMatch)


def semi_args(data: Path, out: Path, *extra: str) -> list[str]:
    """`fastse semi` of a deterministic 16-step WRN-10-1 run: 8 labeled + 16 unlabeled images a step, a
    metrics line every step, a checkpoint every 4, an evaluation every 8."""
    return ["semi", "--data", str(data), "--dataset", "cifar10", "--num-labels", "20", "--depth", "10", "--widen",
            "1", "--labeled-batch", "8", "--mu", "2", "--threshold", "0.3", "--total-steps", "16", "--log-every", "1",
            "--ckpt-every", "4", "--eval-every", "8", "--deterministic", "--no-compile", "--device", DEVICE,
            "--wandb", "disabled", "--cache-dir", str(out.parent / "cache"), "--out", str(out), *extra]


def semi_small(data: Path, out: Path, **changes) -> SemiConfig:
    """`semi_args`'s run in-process: a checkpoint every 5 steps, a metrics line every 100."""
    base = dict(data=str(data), dataset="cifar10", num_labels=20, depth=10, widen=1, labeled_batch=8, mu=2,
                threshold=0.3, total_steps=16, log_every=100, ckpt_every=5, eval_every=100, out=str(out),
                wandb="disabled", device=DEVICE, compile=False, cache_dir=str(out.parent / "cache"))
    return SemiConfig(**{**base, **changes})


def _semi_steps(log: Path) -> int:
    """`fastse semi` progress lines ("step 7/16 | loss ...") in `log` so far."""
    return len(re.findall(r"^step \d+/", log.read_text(), re.MULTILINE))


@pytest.fixture(scope="module")
def semi_reference(data, tmp_path_factory) -> Path:
    """An uninterrupted run of `semi_args`."""
    return uninterrupted(tmp_path_factory.mktemp("semi-reference"), lambda out: semi_args(data, out, "--resume"))


def test_semi_kill_9_then_resume_is_bit_identical_and_logs_each_step_once(data, semi_reference, tmp_path, faults):
    """`fastse semi --resume` killed with SIGKILL right after its 6th metrics line (past the step-4
    checkpoint), then run again to the end: bit-identical to the uninterrupted run, and metrics.jsonl
    holds each step's line once (the killed attempt's lines of steps 5-6 are replaced)."""
    out = tmp_path / "run"
    args = ["-m", "fastse.cli.main", *semi_args(data, out, "--resume")]
    first = tmp_path / "first.txt"
    killed = _kill_when(spawn(args, first), lambda: _semi_steps(first) >= 6, time.monotonic() + HANG_S)
    step = load_checkpoint(latest_checkpoint(out))[1]["step"] if killed == "killed" else -1
    replayed = step >= 0 and max(_logged_steps(out)) > step  # lines the resumed run writes again
    second = tmp_path / "second.txt"
    resumed = spawn(args, second)
    finished = wait(resumed) and resumed.returncode == 0 and f"resumed at step {step}" in second.read_text()
    same = finished and not differences(semi_reference, out)
    logged = finished and _logged_steps(out) == list(range(1, 17))
    faults.add("semi: kill -9 mid-run, --resume", 1, same and logged, lost=step < 4,
               hangs=(killed == "hang") + (not finished),
               outcome="resumed from the newest checkpoint; bit-identical; each step logged once")
    assert killed == "killed" and 4 <= step < 16 and replayed, (killed, step, first.read_text()[-3000:])
    assert finished, second.read_text()[-3000:]
    assert same, differences(semi_reference, out)[:5]
    assert logged, _logged_steps(out)


@pytest.mark.parametrize("bad,at,log_every,message", [
    ("nan", 7, 100, "the loss is not finite from step 7 on (found at step 10)"),  # between log lines: the save checks
    ("inf", 12, 4, "the loss is not finite from step 12 on (found at step 12)"),  # at a log line
])
def test_semi_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, bad, at,
                                                                                       log_every, message, faults):
    out = tmp_path / "run"
    trainer = SemiTrainer(semi_small(data, out, log_every=log_every))
    real = trainer.model.forward

    def forward(*batch):
        loss, stats = real(*batch)
        factor = float(bad) if trainer.step + 1 == at else 1.0
        return loss * factor, stats * factor

    trainer.model.forward = forward
    with pytest.raises(TrainingError) as stopped:
        trainer.fit()
    kept = _kept(out, 10 if at > 10 else 5)
    named = message in str(stopped.value) and "the newest checkpoint stays" in str(stopped.value)
    where = "between log lines" if log_every > 10 else "at a log line"
    faults.add(f"semi: {'NaN' if bad == 'nan' else 'Inf'} loss {where}", 1, named and kept, lost=not kept,
               outcome="stopped naming the step; last good checkpoint kept")
    assert named, str(stopped.value)
    assert kept


@pytest.fixture
def no_wrn(monkeypatch):
    """Fail the test if a Wide ResNet is built anywhere but on the meta device (the checkpoint size estimate)."""
    real = semi_module.WideResNet

    def meta_only(*args, **kwargs):
        net = real(*args, **kwargs)
        if next(net.parameters()).device.type != "meta":
            pytest.fail("a model was built")
        return net

    monkeypatch.setattr(semi_module, "WideResNet", meta_only)


@pytest.mark.parametrize("fault,extra,message", [
    ("keep_prob outside [0, 1]", ["--keep-prob", "1.5"], "--keep-prob=1.5 is outside [0, 1]"),
    ("threshold outside [0, 1]", ["--threshold", "2"], "--threshold=2.0 is outside [0, 1]"),
])
def test_semi_impossible_flags_exit_2(data, tmp_path, fault, extra, message, faults, no_gpu_work):
    out = tmp_path / "run"
    _refused(faults, f"semi {fault}", semi_args(data, out, *extra), message, out)


def test_semi_disk_too_full_for_one_checkpoint_exits_2(data, tmp_path, faults, monkeypatch, no_gpu_work):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 10))
    out = tmp_path / "run"
    _refused(faults, "semi disk too full for one checkpoint", semi_args(data, out),
             "0 MiB free on its disk, but one checkpoint needs about", out)


def test_semi_more_labels_than_images_exits_2(data, tmp_path, faults, no_wrn):
    out = tmp_path / "run"
    _refused(faults, "semi more labels than images", semi_args(data, out, "--num-labels", "100"),
             "--num-labels=100 is more than the 80 training images of", out,
             outcome="one-line error, exit 2, before any model (the data is scanned first)")


def test_semi_resume_of_another_runs_settings_exits_2(data, semi_reference, faults, no_gpu_work):
    args = semi_args(data, semi_reference, "--resume", "--smoothing", "ema", "--widen", "2")
    before = sorted(p.name for p in (semi_reference / "checkpoints").iterdir())
    _refused(faults, "semi --resume of another run's settings", args,
             "holds a run with --widen=1, --rule='sts', this one has --widen=2, --rule='ema'", None)
    assert sorted(p.name for p in (semi_reference / "checkpoints").iterdir()) == before


_SEMI_RANK = """
import json, sys, time, torch
from fastse.semi.config import SemiConfig
from fastse.semi.trainer import SemiTrainer
config, fault = SemiConfig(**json.loads(sys.argv[1])), json.loads(sys.argv[2])
trainer = SemiTrainer(config)
real = trainer.train_step
def step(batch):
    if trainer.env.rank == fault["rank"] and trainer.step + 1 == fault["step"]:
        print(f"FAULT {time.time()}", flush=True)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    return real(batch)
trainer.train_step = step
trainer.fit()
"""
