"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared/data, extracted once into a cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = Path(os.environ.get("FASTSE_CIFAR_ARCHIVE", REPO.parent / "shared/data/cifar10-jpeg.tar.zst"))
CACHE = Path(os.environ.get("FASTSE_TEST_CACHE", Path.home() / ".cache/fastse/test-data"))


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """Root of the real CIFAR-10 JPEG tree: train/<class>/*.jpg (5,000 a class), test/<class>/*.jpg."""
    from fastse.pipelines.datasets import resolve_data

    if os.environ.get("FASTSE_CIFAR_DIR"):  # an already extracted tree (machines without zstd)
        return Path(os.environ["FASTSE_CIFAR_DIR"])
    if not CIFAR_ARCHIVE.is_file():
        pytest.fail(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (set FASTSE_CIFAR_ARCHIVE)")
    return resolve_data(CIFAR_ARCHIVE, cache_dir=CACHE)


@pytest.fixture(scope="session")
def cifar_subset(cifar10_dir, tmp_path_factory):
    """Factory: cifar_subset(train_per_class, test_per_class) -> root of a train/ and test/ class-folder
    tree holding that many of the real CIFAR-10 JPEGs of each class (made once per size; read-only)."""
    import shutil

    made: dict[tuple[int, int], Path] = {}

    def make(train_per_class: int, test_per_class: int) -> Path:
        key = (train_per_class, test_per_class)
        if key not in made:
            root = tmp_path_factory.mktemp(f"cifar-{train_per_class}-{test_per_class}")
            for split, n in (("train", train_per_class), ("test", test_per_class)):
                for cls in sorted((cifar10_dir / split).iterdir()):
                    (root / split / cls.name).mkdir(parents=True)
                    for f in sorted(cls.iterdir())[:n]:
                        shutil.copy(f, root / split / cls.name / f.name)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="module")
def tiny_cifar(cifar_subset) -> Path:
    """10 train and 4 test real CIFAR-10 JPEGs of each class."""
    return cifar_subset(10, 4)


@pytest.fixture(scope="session")
def _tiny_run_once(cifar_subset, tmp_path_factory) -> Path:
    """A 4-step BYOL+STS run on CPU (ResNet-18, narrow heads, 16 px) on `tiny_cifar`'s images, trained once a
    session; never handed to a test (tests get copies: `tiny_run`)."""
    from fastse.pretrain.config import preset
    from fastse.pretrain.trainer import train

    out = tmp_path_factory.mktemp("pretrain-once") / "run"
    train(preset("byol-cifar10", data=str(cifar_subset(10, 4)), image_size=16, batch_size=20, epochs=1, max_steps=4,
                 proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64, knn_every=0, knn_k=10, log_every=2,
                 out=str(out), wandb="disabled", compile=False, device="cpu", cache_dir=str(out.parent / "cache")))
    return out


@pytest.fixture(scope="module")
def tiny_run(_tiny_run_once, tiny_cifar, tmp_path_factory) -> Path:
    """The folder of a fresh 4-step BYOL+STS run on CPU (ResNet-18, narrow heads, 16 px) on `tiny_cifar`, one
    per test module: a copy of the session's one run, the run folder and its cache beside it (tests may write
    into both), whose recorded settings (run.json, each meta.json) name the copy's folders, as a run trained
    there would."""
    import json
    import shutil

    trained_on = json.loads((_tiny_run_once / "run.json").read_text())["config"]["data"]
    assert trained_on == str(tiny_cifar), f"tiny_run is trained on {trained_on}, this module's tiny_cifar differs"
    parent = tmp_path_factory.mktemp("pretrain")
    shutil.copytree(_tiny_run_once.parent, parent, dirs_exist_ok=True)
    run = parent / "run"
    for path in [run / "run.json", *run.glob("**/meta.json")]:
        text = path.read_text()
        for name in ("run", "cache"):  # config "out" and "cache_dir"
            text = text.replace(json.dumps(str(_tiny_run_once.parent / name)), json.dumps(str(parent / name)))
        path.write_text(text)
    return run
