"""Several nodes: `fastse pretrain` under `torchrun --nnodes 2 --rdzv-backend c10d`, two launchers ("nodes")
of one process each on this host (loopback, gloo), as the README's multi-node command and SLURM script start
it: one run folder both read, a cache per node, the teacher bit-identical across nodes, then a resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from fastse.cli.main import main
from test_faults import cli_args

from fastse.checkpoints import latest_checkpoint, load_checkpoint
from fastse.engine import launch as ddp

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150  # both nodes must be done by then; a node still running is killed with its workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(pid: int) -> None:
    """SIGKILL process `pid` and its descendants (torchrun starts its workers in sessions of their own)."""
    children = [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]
    for child in children:
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _two_nodes(data: Path, out: Path, folder: Path, attempt: str, *extra: str) -> list[tuple[int, str]]:
    """(exit code, output) of each of two torchrun launchers meeting at a c10d rendezvous on 127.0.0.1, each
    running `fastse pretrain` (2 epochs of 2 steps at batch 32, 16 a process) into `out` with the cache
    `folder`/node<i>-cache; unset cache folders default to `folder`/default-cache."""
    port, procs, logs = _free_port(), [], []
    for node in range(2):
        args = cli_args(data, out, "--resume", *extra)
        for flag, value in (("--batch-size", "32"), ("--epochs", "2"), ("--device", "cpu"),
                            ("--cache-dir", str(folder / f"node{node}-cache"))):
            args[args.index(flag) + 1] = value
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", attempt,
                    "--max-restarts", "0", "-m", "fastse.cli.main", *args]
        logs.append(folder / f"{attempt}-node{node}.txt")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(launcher, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                                               "FASTSE_CACHE": str(folder / "default-cache")}))
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs)]


def test_two_nodes_train_with_a_cache_each_and_resume(cifar_subset, tmp_path):
    """Stopped at step 2 (--max-steps), then resumed to step 4: both launches exit 0 with 2 processes,
    each node decodes the data into its own --cache-dir, and the teacher ends bit-identical on both. The
    train split alone: no kNN monitor."""
    data, out = cifar_subset(8, 4) / "train", tmp_path / "run"
    first = _two_nodes(data, out, tmp_path, "first", "--max-steps", "2")
    assert [code for code, _ in first] == [0, 0], first
    text = "".join(output for _, output in first)
    assert "| 2 process(es) on cpu, batch 32 (16 per process) |" in text
    assert load_checkpoint(latest_checkpoint(out))[1]["step"] == 2
    for node in range(2):  # local rank 0 of each node prepared its node's copy
        assert list((tmp_path / f"node{node}-cache" / "arrays").glob("*-train-80-*.npy")), node
    assert not (tmp_path / "default-cache").exists()

    second = _two_nodes(data, out, tmp_path, "second")
    assert [code for code, _ in second] == [0, 0], second
    text = "".join(output for _, output in second)
    assert "resumed at step 2" in text
    assert "teacher parameters bit-identical on all 2 processes at step 4" in text
    meta = load_checkpoint(latest_checkpoint(out))[1]
    assert (meta["step"], meta["world_size"]) == (4, 2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert any(m.get("teacher_bit_identical") and m["step"] == 4 for m in metrics)


def test_launch_env_reads_the_place_on_its_node(monkeypatch):
    """Rank 5 of 8 as torchrun sets it on the second of two nodes of 4 processes: the local rank picks the
    GPU; without LOCAL_WORLD_SIZE (another launcher) all processes count as on this node."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    env = ddp.launch_env("cuda")
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.device == torch.device("cuda", 1) and not env.is_main
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert ddp.launch_env("cpu").local_world_size == 8


def test_more_processes_on_a_node_than_gpus_exits_2(cifar_subset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(ddp, "init_distributed", lambda *a, **k: pytest.fail("reached init_distributed"))
    for name, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    args = cli_args(cifar_subset(8, 4), tmp_path / "run")
    args[args.index("--device") + 1] = "cuda"
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "LOCAL_RANK=3, but this node has 2 GPU(s): start at most 2 process(es) a node" in result.output
    assert "Traceback" not in result.output
