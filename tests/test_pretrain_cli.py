"""`fastse pretrain` and `PretrainConfig`: presets, method defaults, refused settings (exit 2), a tiny real run."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from fastse.cli import pretrain as cli
from fastse.cli.main import main

from fastse.checkpoints import latest_checkpoint, load_checkpoint
from fastse.pretrain import config as cfg
from fastse.pretrain.config import PRESETS, PretrainConfig, preset


def test_method_defaults_come_from_the_paper():
    byol, moco = PretrainConfig(method="byol"), PretrainConfig(method="mocov2")
    assert (byol.keep_prob, byol.momentum, byol.momentum_schedule) == (0.7, 0.99, "cosine")
    assert (byol.proj_hidden_dim, byol.proj_dim, byol.pred_hidden_dim) == (4096, 256, 4096)
    assert (moco.keep_prob, moco.momentum, moco.momentum_schedule) == (0.5, 0.999, "constant")
    assert (moco.queue_size, moco.temperature, moco.proj_hidden_dim, moco.proj_dim) == (65536, 0.2, 2048, 128)
    assert byol.smoothing == moco.smoothing == "sts" and byol.granularity == "tensor"
    switched = byol.replace(method="mocov2")  # a changed method re-fills its defaults
    assert (switched.keep_prob, switched.momentum, switched.queue_size) == (0.5, 0.999, 65536)
    assert byol.replace(method="mocov2", keep_prob=0.3).keep_prob == 0.3


def test_presets():
    assert set(PRESETS) == set(cli.PRESET_NAMES)
    for name, config in PRESETS.items():
        config.replace(data="somewhere").validate(world_size=8)
        assert config.method == name.split("-")[0]
    c = preset("byol-cifar10", epochs=5)
    assert (c.arch, c.cifar_stem, c.dataset, c.batch_size, c.epochs) == ("resnet18", True, "cifar10", 512, 5)
    assert c.scaled_lr == pytest.approx(0.06) and c.keep_prob == 0.7
    m = preset("mocov2-imagenet")
    assert (m.arch, m.cifar_stem, m.queue_size, m.momentum, m.keep_prob) == ("resnet50", False, 65536, 0.999, 0.5)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("simclr-cifar10")


def test_cli_choices_match_the_library():
    from fastse.models.resnet import ARCHS
    from fastse.smoothing import GRANULARITIES, RULES

    library = {"method": cfg.METHODS, "arch": ARCHS, "dataset": cfg.DATASETS, "loader": cfg.LOADERS,
               "optimizer": cfg.OPTIMIZERS, "rule": RULES, "granularity": GRANULARITIES,
               "momentum_schedule": cfg.MOMENTUM_SCHEDULES, "augmentation": cfg.AUGMENTATIONS}
    assert {k: tuple(v) for k, v in library.items()} == cli.CHOICES
    from fastse.cli import training

    assert (training.COMPILE_MODES, training.WANDB_MODES) == (cfg.COMPILE_MODES, cfg.WANDB_MODES)
    from fastse.pipelines.recipes import AUGMENTATIONS, RECIPES

    assert cfg.AUGMENTATIONS == AUGMENTATIONS and all(len(RECIPES[a](32).views) == 2 for a in AUGMENTATIONS)


@pytest.mark.parametrize("changes,message", [
    (dict(keep_prob=1.5), "keep_prob=1.5 is outside"),
    (dict(momentum=-0.1), "momentum=-0.1 is outside"),
    (dict(arch="vit"), "arch='vit' is not one of"),
    (dict(method="simclr"), "method='simclr' is not one of"),
    (dict(smoothing="swa"), "rule='swa'"),
    (dict(epochs=0), "epochs=0 must be >= 1"),
    (dict(warmup_epochs=300), "warmup_epochs=300 must be shorter"),
    (dict(data=None, dataset=None), "data=None and dataset=None"),
    (dict(data=None, dataset="imagenet"), "cannot be downloaded"),
    (dict(method="mocov2", queue_size=100), "queue_size=100 must hold at least one batch"),
    (dict(max_steps=0), "max_steps=0"),
])
def test_validate_refuses_impossible_settings(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        PretrainConfig(data="cifar10").replace(**changes).validate()


def test_validate_needs_a_batch_divisible_by_the_processes():
    PretrainConfig(data="cifar10", batch_size=256).validate(world_size=8)
    with pytest.raises(ValueError, match="batch_size=100 is not divisible by the 8 processes"):
        PretrainConfig(data="cifar10", batch_size=100).validate(world_size=8)


@pytest.mark.parametrize("args,message", [
    (["--preset", "byol-cifar10", "--keep-prob", "1.5"], "--keep-prob=1.5 is outside [0, 1]"),
    (["--preset", "byol-cifar10", "--method", "mocov2"], "use --preset mocov2-cifar10"),
    (["--data", "/no/such/folder"], "/no/such/folder: no such folder or archive"),
    (["--preset", "byol-imagenet"], "--dataset=imagenet cannot be downloaded"),
    (["--preset", "byol-cifar10", "--arch", "vgg16"], "Invalid value for '--arch'"),
    (["--preset", "byol-cifar10", "--smoothing", "swa"], "Invalid value for '--rule' / '--smoothing'"),
    (["--data", "cifar10", "--epochs", "0"], "--epochs=0 must be >= 1"),
    (["--preset", "byol-cifar10", "--pred-hidden-dim", "0"], "--pred-hidden-dim=0 must be >= 1"),
    (["--preset", "mocov2-cifar10", "--temperature", "0"], "--temperature=0.0 must be > 0"),
    pytest.param(["--data", "cifar10", "--device", "cuda"], "--device='cuda', but CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")),
])
def test_bad_flags_exit_2_with_one_clear_line(args, message):
    result = CliRunner().invoke(main, ["pretrain", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def tiny_cifar(cifar10_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cifar")
    for split, n in (("train", 4), ("test", 2)):
        for cls in sorted((cifar10_dir / split).iterdir()):
            (root / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, root / split / cls.name / f.name)
    return root


def tiny_run(data, tmp_path, out, *extra: str):
    """`fastse pretrain --preset byol-cifar10` on the tiny tree at 16 px, batch 8, eager, into `out`."""
    return CliRunner().invoke(main, [
        "pretrain", "--preset", "byol-cifar10", "--data", str(data), "--image-size", "16",
        "--batch-size", "8", "--epochs", "2", "--log-every", "1", "--out", str(out), "--wandb", "disabled",
        "--cache-dir", str(tmp_path / "cache"), "--no-compile", *extra])


def test_a_tiny_run_prints_the_knn_score_and_refuses_to_overwrite_it(tiny_cifar, tmp_path):
    out = tmp_path / "run"

    def run(*extra: str):
        return tiny_run(tiny_cifar, tmp_path, out, *extra)

    result = run("--max-steps", "3")
    assert result.exit_code == 0, result.output
    assert "teacher kNN top-1" in result.output and "step 3/3" in result.output
    assert (out / "backbone.safetensors").is_file() and (out / "checkpoints" / "step-000000003").is_dir()
    again = run("--max-steps", "3")
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = run("--max-steps", "4", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at step 3" in resumed.output and (out / "checkpoints" / "step-000000004").is_dir()


def test_head_flags_set_the_widths_of_student_and_teacher(tiny_cifar, tmp_path):
    out = tmp_path / "run"
    result = tiny_run(tiny_cifar, tmp_path, out, "--max-steps", "1",
                      "--proj-hidden-dim", "48", "--proj-dim", "24", "--pred-hidden-dim", "40")
    assert result.exit_code == 0, result.output
    groups, meta = load_checkpoint(latest_checkpoint(out))
    config = meta["config"]
    assert (config["proj_hidden_dim"], config["proj_dim"], config["pred_hidden_dim"]) == (48, 24, 40)
    shapes = {f"{group}.{name}": tuple(t.shape) for group, tensors in groups.items() for name, t in tensors.items()}
    assert shapes["student.encoder.head.0.weight"] == (48, 512)
    assert shapes["student.encoder.head.3.weight"] == (24, 48)
    assert shapes["student.predictor.0.weight"] == (40, 24)
    assert shapes["teacher.head.3.weight"] == (24, 48)
