"""Run folders written by fastse before its restructuring into fastse/pretrain, fastse/settings.py and the
rename of `smoothing` to `rule` (issue #20) resume with today's code: the code of that commit, taken from
this checkout's git history, trains the first steps and writes the checkpoint; today's code resumes it and
ends bit-identical to a run it trained start to end."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from fastse.checkpoints import latest_checkpoint, load_checkpoint

BEFORE = "f4361e2"  # the last commit before the restructuring: fastse/config.py, fastse/engine/trainer.py
REPO = Path(__file__).resolve().parents[1]

# Runs `train` of the code at BEFORE on the config given as JSON: fastse.config and fastse.engine.trainer for
# pretraining, fastse.semi for FixMatch (that code found its pipelines/ through fastse.__path__).
OLD_TRAIN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fastse
assert fastse.__file__.startswith(sys.argv[1]), fastse.__file__
if sys.argv[2] == "pretrain":
    from fastse.config import PretrainConfig as Config
    from fastse.engine.trainer import train
else:
    from fastse.semi.config import SemiConfig as Config
    from fastse.semi.trainer import train
print(json.dumps(train(Config(**json.loads(sys.argv[3])))["step"]))
"""


@pytest.fixture(scope="module")
def before(tmp_path_factory) -> Path:
    """The source tree of commit BEFORE, from the checkout's history."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout of fastse (the old code comes from its history)")
    found = subprocess.run([git, "-C", str(REPO), "cat-file", "-e", f"{BEFORE}^{{commit}}"], capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this checkout's history (a shallow clone?)")
    archive = subprocess.run([git, "-C", str(REPO), "archive", "--format=tar", BEFORE, "fastse", "pipelines"],
                             capture_output=True, check=True).stdout
    root = tmp_path_factory.mktemp("before")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


def _train_before(before: Path, kind: str, config: dict, cwd: Path) -> int:
    result = subprocess.run([sys.executable, "-c", OLD_TRAIN, str(before), kind, json.dumps(config)], cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_same_end(a: Path, b: Path, step: int, groups: tuple[str, ...]) -> None:
    (ga, ma), (gb, mb) = (load_checkpoint(latest_checkpoint(r)) for r in (a, b))
    assert ma["step"] == mb["step"] == step and ma["smoother"] == mb["smoother"]
    for group in groups:
        assert ga[group].keys() == gb[group].keys()
        different = [k for k in ga[group] if not torch.equal(ga[group][k], gb[group][k])]
        assert not different, f"{group}: {different[:3]}"


def test_a_pretraining_checkpoint_written_before_resumes_bit_identical(before, tiny_cifar, tmp_path):
    from fastse.pretrain.config import PretrainConfig
    from fastse.pretrain.trainer import train

    # MoCo (queue) with LARS, warmup and a cosine teacher schedule, STS at channel granularity: every kind of state;
    # 48 images, 6 steps an epoch: the old code stops mid-epoch 2
    settings = dict(method="mocov2", arch="resnet18", cifar_stem=True, data=str(tiny_cifar), dataset="cifar10",
                    image_size=16, epochs=2, batch_size=8, limit=48, optimizer="lars", lr=0.5, warmup_epochs=1,
                    momentum=0.99, momentum_schedule="cosine", granularity="channel", proj_hidden_dim=64,
                    proj_dim=32, pred_hidden_dim=64, queue_size=32, log_every=5, knn_every=0, deterministic=True,
                    wandb="disabled", device="cpu", compile=False, cache_dir=str(tmp_path / "cache"))
    old = tmp_path / "old"
    assert _train_before(before, "pretrain", {**settings, "smoothing": "sts", "out": str(old), "max_steps": 8},
                         tmp_path) == 8  # mid-epoch
    assert "smoothing" in json.loads((old / "run.json").read_text())["config"]  # written as that code wrote it
    train(PretrainConfig(**settings, rule="sts", out=str(old)), resume=True)
    train(PretrainConfig(**settings, rule="sts", out=str(tmp_path / "new")))
    _assert_same_end(old, tmp_path / "new", 12, ("student", "teacher", "optimizer", "queue", "probe"))


def test_a_fixmatch_checkpoint_written_before_resumes_bit_identical(before, tiny_cifar, tmp_path):
    from fastse.semi.config import SemiConfig
    from fastse.semi.trainer import train

    settings = dict(data=str(tiny_cifar), dataset="cifar10", num_labels=20, depth=10, widen=1, labeled_batch=8, mu=2,
                    total_steps=10, eval_every=100, log_every=5, ckpt_every=100, granularity="channel",
                    buffers="ema", teacher_targets=True, threshold=0.3, deterministic=True, wandb="disabled",
                    device="cpu", compile=False, cache_dir=str(tmp_path / "cache"))
    old = tmp_path / "old"
    assert _train_before(before, "semi", {**settings, "smoothing": "sts", "out": str(old), "max_steps": 4},
                         tmp_path) == 4
    assert "smoothing" in json.loads((old / "run.json").read_text())["config"]
    train(SemiConfig(**settings, rule="sts", out=str(old)), resume=True)
    train(SemiConfig(**settings, rule="sts", out=str(tmp_path / "new")))
    _assert_same_end(old, tmp_path / "new", 10, ("student", "teacher", "optimizer"))
