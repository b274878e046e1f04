"""The ImageNet-scale tools on CPU: the ImageNet-like tree (layout, file statistics, bad-data files the
pipeline must take) and the step benchmarks end to end with tiny counts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastse.pipelines import recipes
from fastse.pipelines.datasets import scan_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inl") / "tree"
    subprocess.run([sys.executable, str(REPO / "benchmarks/make_imagenet_like.py"), str(out), "--images", "48",
                    "--classes", "3", "--val-images", "6", "--workers", "2"], check=True, timeout=300)
    return out


def test_imagenet_like_tree_has_imagenet_layout_and_its_odd_files(imagenet_like):
    train = scan_image_folder(imagenet_like, split="train")
    val = scan_image_folder(imagenet_like, split="val", classes=train.classes)
    assert len(train) == 48 and len(val) == 6 and len(train.classes) == 3
    assert all(f.suffix == ".JPEG" and f.name.startswith(f.parent.name) for f in train.files)
    assert train.counts["png"] == 1 and train.counts["cmyk"] >= 1 and train.counts["gray"] >= 1
    sides = np.sort(train.sizes, axis=1)[:, 1]
    assert (sides >= 150).all() and np.median(sides) == 500 and len(np.unique(train.sizes, axis=0)) > 5
    again = imagenet_like.parent / "again"  # a pure function of (seed, index): the same bytes again
    subprocess.run([sys.executable, str(REPO / "benchmarks/make_imagenet_like.py"), str(again), "--images", "48",
                    "--classes", "3", "--val-images", "6", "--workers", "1"], check=True, timeout=300)
    assert all(f.read_bytes() == (again / f.relative_to(imagenet_like)).read_bytes() for f in train.files)
    refused = subprocess.run([sys.executable, str(REPO / "benchmarks/make_imagenet_like.py"), str(imagenet_like)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "is not an empty folder" in refused.stderr


def test_dali_reads_every_file_of_the_tree_at_224_px(imagenet_like):
    pytest.importorskip("nvidia.dali")
    import torch
    from fastse.pipelines.dali_backend import DaliLoader

    train = scan_image_folder(imagenet_like, split="train")
    loader = DaliLoader(train, None, recipes.byol(224), batch_size=16, device="cpu", dtype=torch.bfloat16)
    loader.set_epoch(0)
    labels = []
    for views, y in loader:  # the PNG named .JPEG, the CMYK and the gray JPEGs among them
        assert all(v.shape == (16, 3, 224, 224) and torch.isfinite(v.float()).all() for v in views)
        labels.append(y)
    assert sorted(torch.cat(labels).tolist()) == sorted(train.labels.tolist())


@pytest.mark.parametrize("script,extra", [  # 4 steps an epoch each; the first timed real block crosses its end
    ("pretrain_step.py", ["--preset", "byol-cifar10", "--limit", "64", "--batch-size", "16", "--steps", "1",
                          "--variant", "default", "--variant", "fused:decode=fused,threads=1,hw=0.9"]),
    ("linear_step.py", ["--arch", "resnet18", "--limit", "128", "--batch-size", "32", "--steps", "2"]),
])
def test_step_benchmarks_run_on_cpu(cifar_subset, script, extra):
    pytest.importorskip("nvidia.dali")
    data = cifar_subset(20, 20)  # 200 train and 200 test JPEGs: the benchmarks' scans of the tree take no time
    cmd = [sys.executable, str(REPO / "benchmarks" / script), "--data", str(data), "--loader", "dali",
           "--device", "cpu", "--rounds", "1", "--warmup", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    if script == "pretrain_step.py":  # two variants, both timed across an epoch end
        assert [r.split("|")[1].strip() for r in rows[1:]] == ["default", "fused"]
        assert all(r.rstrip(" |").endswith(("1", "2")) for r in rows[1:])
    else:
        assert [r.split("|")[1].strip() for r in rows[1:]] == ["real", "synthetic", "loader"]
        assert "epoch ends in the timed real blocks: 1" in out.stdout or "blocks: 2" in out.stdout
