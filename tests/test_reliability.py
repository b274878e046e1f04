"""Reliability, round 2 (issue 21, items 2, 5 and 6), on real tiny runs (CIFAR-10 JPEGs) through the CLI.

One owner per run folder: a second `pretrain`, `--resume`, `semi` or evaluation on a live run's folder
exits 2 naming the owner's pid and host; the ranks of one run share it; kill -9 leaves no stale lock.
A user's mistake is one line naming the path or flag, exit 2, no traceback: an unwritable cache folder,
an unreadable data root or class folder, `report --out` on a file or a read-only folder, an absurd
`--image-size`, an evaluation of a read-only run folder (the result printed first). Bad values are
refused before any work: non-finite numbers, `--out ""`; a batch larger than the data and corrupt images
name flags and commands that exist; `--resume` without `--data` trains on the run's data.

Root ignores permission bits (tests run as root here and in CI): a read-only or unreadable folder is
made by failing the system calls on it as the OS does for a user without the permission (EROFS, EACCES).
Each fault is counted in a table printed at the end of pytest's report, as in test_faults.py.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import multiprocessing
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import test_faults
from click.testing import CliRunner
from fastse.cli.main import main
from test_faults import HANG_S, FaultTable, _refused, cli_args, semi_args, semi_small, small, spawn

from fastse.checkpoints import latest_checkpoint
from fastse.engine import runs
from fastse.runlock import LOCK_FILE, FolderInUse, RunLock
from fastse.semi.trainer import SemiTrainer

HOST = socket.gethostname()
# test_faults' fixtures: its tiny data set; failing the test where a GPU or a model would be touched
data, no_gpu_work, no_model = test_faults.data, test_faults.no_gpu_work, test_faults.no_model


@pytest.fixture(scope="module")
def faults(request) -> FaultTable:
    table = FaultTable()
    request.config.pluginmanager.register(table, "fastse-reliability-table")
    return table


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


def read_only(monkeypatch, folder: Path) -> None:
    """Writes into `folder` fail as on a read-only file system (EROFS), for root too: opening a file there
    for writing or creating one, making a folder."""
    folder = folder.resolve()

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        path = Path(os.fsdecode(path)).resolve()
        return path == folder or folder in path.parents

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.exists(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    for module, name, fake in ((builtins, "open", open_), (io, "open", open_), (os, "open", os_open),
                               (os, "mkdir", mkdir)):
        monkeypatch.setattr(module, name, fake)


def unreadable(monkeypatch, folder: Path) -> None:
    """Listing `folder` fails with EACCES, as for a folder without read permission, for root too."""
    folder = folder.resolve()

    def guarded(real):
        def listing(path=".", *args, **kwargs):
            if not isinstance(path, int) and Path(os.fsdecode(path)).resolve() == folder:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return listing

    monkeypatch.setattr(os, "scandir", guarded(os.scandir))
    monkeypatch.setattr(os, "listdir", guarded(os.listdir))


# ------------------------------------------------------------------------------ one owner per run folder


def _owned_by(proc, out: Path) -> bool:
    """Wait until `proc` holds the lock of `out` (True), or has ended or hangs (False)."""
    for _ in range(HANG_S * 10):
        try:
            if json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid:
                return True
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def test_a_live_runs_folder_is_refused_to_a_second_process_and_free_after_kill_9(data, tmp_path, faults,
                                                                                 monkeypatch, no_gpu_work):
    out = tmp_path / "run"
    owner = spawn(["-m", "fastse.cli.main", *cli_args(data, out, "--epochs", "1000")], tmp_path / "owner.txt")
    try:
        assert _owned_by(owner, out), (tmp_path / "owner.txt").read_text()[-3000:]
        held = f"{out} is in use by process {owner.pid} on {HOST}"
        outcome = "one-line error naming the owner's pid and host, exit 2, before any GPU work"
        _refused(faults, "second pretrain in a live run's folder", cli_args(data, out), held, None, outcome)
        _refused(faults, "--resume while the run is alive", cli_args(data, out, "--resume"), held, None, outcome)
        _refused(faults, "semi in a live run's folder", semi_args(data, out), held, None, outcome)
        _refused(faults, "knn writing eval.json in a live run's folder",
                 ["knn", "--checkpoint", str(out), "--data", str(data), "--device", "cpu"], held, None, outcome)
        assert owner.poll() is None, "the owner ended while the others were refused"
    finally:
        owner.kill()
        owner.wait()
    monkeypatch.undo()  # no_gpu_work: this one trains
    latest = latest_checkpoint(out)
    done = int(latest.name.split("-")[1]) if latest else 0
    resumed = CliRunner().invoke(main, cli_args(data, out, "--epochs", "1000", "--max-steps", str(done + 1),
                                                "--resume"))
    faults.add("kill -9 of a run folder's owner, then --resume", 1, resumed.exit_code == 0,
               outcome="no stale lock: resumed")
    assert resumed.exit_code == 0, resumed.output
    assert latest_checkpoint(out).name == f"step-{done + 1:09d}"


def test_semi_owns_its_run_folder_until_it_ends(data, tmp_path, faults):
    out = tmp_path / "run"
    trainer = SemiTrainer(semi_small(data, out, max_steps=2))
    _refused(faults, "semi --resume while the run is alive", semi_args(data, out, "--resume"),
             f"{out} is in use by process {os.getpid()} on {HOST}", None,
             "one-line error naming the owner's pid and host, exit 2, before any GPU work")
    trainer.fit()
    RunLock(out).release()  # given up at the end


def test_the_ranks_of_one_run_share_its_folder_and_no_other_run_can(data, tmp_path, monkeypatch):
    config = small(data, tmp_path / "run")
    check = dict(resume=False, fixed=(), checkpoint_bytes=lambda c: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it, before any process group
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    env, _, lock = runs.preflight(config, **check)
    assert env.rank == 0 and lock is not None
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert runs.preflight(config, **check)[2] is None  # rank 1 of the same run writes through rank 0
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(FolderInUse, match=f"in use by process {os.getpid()} on {HOST}"):
            runs.preflight(config, **check)  # rank 0 of another run
    finally:
        lock.release()
    runs.preflight(config, **check)[2].release()


def _asleep(running) -> None:
    running.set()
    time.sleep(HANG_S)


def test_a_forked_worker_that_outlives_its_parents_hold_keeps_no_lock(tmp_path):
    lock = RunLock(tmp_path)
    fork = multiprocessing.get_context("fork")
    running = fork.Event()
    worker = fork.Process(target=_asleep, args=(running,))  # as a data worker
    worker.start()
    try:
        assert running.wait(HANG_S)
        lock.release()
        RunLock(tmp_path).release()  # the worker closed its copy of the lock at the fork
    finally:
        worker.kill()
        worker.join()


# -------------------------------------------------------------------- a user's mistake: one line, exit 2


def test_unwritable_cache_folder_exits_2(data, tmp_path, faults, no_model):
    blocker = tmp_path / "file"
    blocker.write_text("in the way")
    out = tmp_path / "run"
    _refused(faults, "cache folder not writable", [*cli_args(data, out), "--cache-dir", str(blocker / "cache")],
             f"{blocker / 'cache' / 'arrays'}: the cache folder cannot be written (Not a directory); choose another "
             "with --cache-dir", out, "one-line error, exit 2, before any model")


@pytest.mark.parametrize("where", ["data root", "class folder"])
def test_unreadable_data_root_or_class_folder_exits_2(data, tmp_path, where, faults, monkeypatch, no_model):
    folder = data if where == "data root" else data / "train" / "cat"
    unreadable(monkeypatch, folder)
    message = f"{folder.resolve()}: cannot be read (Permission denied)"
    check = CliRunner().invoke(main, ["data", "check", str(data)])
    assert check.exit_code == 2 and message in check.output and "Traceback" not in check.output, check.output
    _refused(faults, f"{where} not readable", cli_args(data, tmp_path / "run"), message, tmp_path / "run",
             "shown by data check; pretrain names it: exit 2 before any model")


@pytest.mark.parametrize("where", ["a file", "a read-only folder"])
def test_report_out_on_a_file_or_read_only_folder_exits_2(tiny_run, tmp_path, where, faults, monkeypatch):
    out = tmp_path / "report"
    if where == "a file":
        out.write_text("in the way")
    else:
        out.mkdir()
        read_only(monkeypatch, out)
    message = f"{out}: --out is " + ("a file" if where == "a file" else "a folder that cannot be written")
    _refused(faults, f"report --out on {where}", ["report", str(tiny_run), "--out", str(out)], message, None,
             "one-line error, exit 2")
    assert not (out.is_dir() and any(out.iterdir()))


def test_absurd_image_size_exits_2(data, tmp_path, faults, no_gpu_work):
    out = tmp_path / "run"
    _refused(faults, "absurd --image-size", cli_args(data, out, "--image-size", "100000"),
             "--image-size=100000 px is outside [8, 4096]", out)


@pytest.mark.parametrize("command", [["knn", "--k", "5"],
                                     ["eval-linear", "--protocol", "fast", "--epochs", "1", "--batch-size", "25"]])
def test_eval_of_a_read_only_run_folder_prints_the_result_then_where_it_was_not_saved(tiny_run, tiny_cifar, tmp_path,
                                                                                      command, faults, monkeypatch):
    before = sorted(p.name for p in tiny_run.iterdir())
    read_only(monkeypatch, tiny_run)
    result = CliRunner().invoke(main, [*command, "--checkpoint", str(tiny_run), "--data", str(tiny_cifar),
                                       "--device", "cpu", "--wandb", "offline", "--cache-dir", str(tmp_path)])
    lines = result.output.splitlines()
    key = "knn" if command[0] == "knn" else "fast"
    score = [i for i, line in enumerate(lines) if line.startswith(f"{key}: top-1")]
    error = [i for i, line in enumerate(lines) if line.startswith("Error:")]
    ok = (result.exit_code == 2 and len(error) == 1 and len(score) == 1 and score[0] < error[0]
          and f"{tiny_run / 'eval.json'}: the result could not be saved" in lines[error[0]]
          and "Traceback" not in result.output)
    faults.add(f"input: {command[0]} of a read-only run folder", 1, ok,
               outcome="the result printed, then one line: where it could not be saved; exit 2")
    assert ok, result.output
    assert sorted(p.name for p in tiny_run.iterdir()) == before


# ----------------------------------------------------------------------------- bad values caught at start


@pytest.mark.parametrize("command,flag,value", [
    ("pretrain", "--lr", "nan"), ("pretrain", "--lr", "inf"), ("pretrain", "--weight-decay", "nan"),
    ("pretrain", "--momentum", "nan"), ("pretrain", "--warmup-epochs", "inf"), ("semi", "--weight-decay", "nan"),
    ("semi", "--lambda-u", "inf"), ("semi", "--lr", "-inf"),
])
def test_non_finite_settings_exit_2_before_any_work(data, tmp_path, command, flag, value, faults, no_gpu_work):
    out = tmp_path / "run"
    args = (cli_args if command == "pretrain" else semi_args)(data, out, flag, value)
    _refused(faults, f"{command} non-finite {flag}", args, f"{flag}={value} must be a finite number", out)


@pytest.mark.parametrize("command", [["knn", "--temperature", "inf"], ["eval-linear", "--lr", "inf"]])
def test_non_finite_eval_settings_exit_2(tiny_run, tiny_cifar, tmp_path, command, faults):
    args = [*command, "--checkpoint", str(tiny_run), "--data", str(tiny_cifar), "--device", "cpu",
            "--wandb", "disabled", "--cache-dir", str(tmp_path)]
    _refused(faults, f"{command[0]} non-finite {command[1]}", args, f"{command[1]}=inf", None)
    assert not (tiny_run / "eval.json").exists()


@pytest.mark.parametrize("command", ["pretrain", "semi"])
def test_empty_out_is_refused(data, tmp_path, command, faults, monkeypatch, no_gpu_work):
    monkeypatch.chdir(tmp_path)
    args = (cli_args if command == "pretrain" else semi_args)(data, tmp_path / "run", "--out", "")
    _refused(faults, f"{command} --out ''", args, "--out='' names no folder", tmp_path)
    assert not (tmp_path / "run.json").exists()


def test_a_batch_larger_than_the_data_names_the_flag(data, tmp_path, faults, no_model):
    out = tmp_path / "run"
    _refused(faults, "batch larger than the data", cli_args(data, out, "--batch-size", "96", "--queue-size", "96"),
             "--batch-size=96 is more than the 80 training images", out, "one-line error, exit 2, before any model")


def test_corrupt_images_suggest_a_command_that_exists(data, tmp_path, faults, no_model):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    bad = sorted((root / "train" / "cat").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:300])
    result = CliRunner().invoke(main, cli_args(root, tmp_path / "run"))
    suggested = next(line for line in result.output.splitlines() if "fastse data check" in line)
    command = suggested.split("`")[1].split()[1:]  # as a user would paste it
    check = CliRunner().invoke(main, command)
    ok = (result.exit_code == 2 and "on_corrupt" not in result.output and check.exit_code == 2
          and str(bad) in check.output)
    faults.add("input: corrupt image (the advice)", 1, ok, outcome="names the file and a command that exists")
    assert ok, result.output + check.output


def test_resume_without_data_trains_on_the_runs_data(data, tmp_path, faults):
    def without_preset(args: list[str]) -> list[str]:  # no --dataset either: nothing else to take the data from
        at = args.index("--preset")
        return [*args[:at], "--method", "mocov2", "--arch", "resnet18", "--cifar-stem", *args[at + 2:]]

    out = tmp_path / "run"
    first = CliRunner().invoke(main, without_preset(cli_args(data, out, "--max-steps", "2")))
    assert first.exit_code == 0, first.output
    args = without_preset(cli_args(data, out, "--max-steps", "3", "--resume"))
    del args[args.index("--data"):args.index("--data") + 2]
    resumed = CliRunner().invoke(main, args)
    ok = resumed.exit_code == 0 and f"images of {data}" in resumed.output
    faults.add("input: --resume without --data", 1, ok, outcome="trains on the run's recorded data")
    assert ok, resumed.output
    assert latest_checkpoint(out).name == "step-000000003"
