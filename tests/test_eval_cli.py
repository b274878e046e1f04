"""`fastse eval-linear` and `fastse knn` on a tiny pretraining run over real CIFAR-10 JPEGs: eval.json
written and merged, torchvision state dicts accepted, bad checkpoints and flags refused with exit 2."""

from __future__ import annotations

import pytest
import torch
import torchvision
from click.testing import CliRunner
from fastse.cli.main import main

from fastse.results import read_results


def run(*args: str):
    return CliRunner().invoke(main, [*args, "--device", "cpu", "--wandb", "disabled"])


def test_both_commands_write_eval_json(tiny_run, tiny_cifar):
    data = ["--checkpoint", str(tiny_run), "--data", str(tiny_cifar), "--dataset", "cifar10",
            "--cache-dir", str(tiny_run.parent / "cache")]
    fast = run("eval-linear", *data, "--protocol", "fast", "--epochs", "3", "--batch-size", "50", "--copies", "1")
    assert fast.exit_code == 0, fast.output
    assert "linear fast: epoch 3/3 | loss" in fast.output and "fast: top-1" in fast.output
    byol = run("eval-linear", *data, "--epochs", "1", "--batch-size", "25", "--limit", "50", "--which", "student")
    assert byol.exit_code == 0, byol.output
    knn = run("knn", *data, "--k", "20")
    assert knn.exit_code == 0, knn.output
    result = {r["kind"]: r for r in read_results(tiny_run)}
    assert list(result) == ["fast", "byol", "knn"]  # every result kept, oldest first
    for entry in result.values():
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 100.0 and entry["top5"] > 0
        assert entry["data"] == str(tiny_cifar) and entry["time"] and entry["seconds"] > 0
    assert result["fast"]["which"] == "teacher" and result["fast"]["epochs"] == 3 and result["fast"]["copies"] == 1
    assert result["byol"]["which"] == "student" and result["byol"]["train_images"] == 50
    assert result["knn"]["k"] == 20 and result["knn"]["test_images"] == 40


def test_torchvision_state_dict(tiny_cifar, tmp_path):
    file = tmp_path / "models" / "resnet18.pth"
    file.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}}, file)
    result = run("knn", "--checkpoint", str(file), "--arch", "resnet18", "--data", str(tiny_cifar), "--limit", "30",
                 "--k", "5", "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 0, result.output
    assert [(r["kind"], r["train_images"]) for r in read_results(file.parent)] == [("knn", 30)]


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "{tmp}/missing"], "does not exist"),
    (["--checkpoint", "{tmp}/junk.pth", "--arch", "resnet18"], "not a readable PyTorch state dict"),
    (["--checkpoint", "{tmp}/r18.pth"], "give --arch"),
    (["--checkpoint", "{tmp}/r18.pth", "--arch", "resnet50"], "not a resnet50 state dict: 'layer1.0.conv1.weight'"),
    (["--checkpoint", "{run}", "--arch", "resnet50"], "does not match the run's architecture resnet18"),
    (["--checkpoint", "{run}", "--protocol", "byol", "--copies", "2"], "--copies=2"),
    (["--checkpoint", "{run}", "--epochs", "0"], "--epochs=0 must be >= 1"),
    (["--checkpoint", "{run}", "--batch-size", "300"], "--batch-size=300 is larger than the 100 train images"),
    (["--checkpoint", "{run}/checkpoints"], "no complete checkpoint"),
])
def test_bad_checkpoints_exit_2_with_one_clear_line(tiny_run, tiny_cifar, tmp_path, args, message):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    args = [a.format(tmp=tmp_path, run=tiny_run) for a in args]
    result = run("eval-linear", *args, "--data", str(tiny_cifar))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_knn_refuses_bad_flags(tiny_run, tiny_cifar):
    result = run("knn", "--checkpoint", str(tiny_run), "--data", str(tiny_cifar), "--k", "0")
    assert result.exit_code == 2 and "--k=0" in result.output


def test_cli_archs_match_the_library():
    from fastse.cli.evaluate import ARCHS

    from fastse.models.resnet import ARCHS as LIBRARY

    assert ARCHS == LIBRARY
