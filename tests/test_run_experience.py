"""What a run shows and keeps besides its scalars (issue 19 items 2, 3, 4, 6), on tiny real CIFAR-10 runs (CPU,
16 px): the augmentation preview, the online linear probe, config files in and out, and the best/ checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastse.cli import pretrain as cli
from fastse.cli.main import main

from fastse import checkpoints as ckpt
from fastse.models.export import load_backbone
from fastse.pretrain.config import MONITORS, PretrainConfig
from fastse.pretrain.trainer import Trainer
from fastse.settings import config_toml, read_config_file


@pytest.fixture(scope="module")
def data(cifar_subset) -> Path:
    """20 train and 20 test real CIFAR-10 JPEGs of each class."""
    return cifar_subset(20, 20)


def small(data: Path, out: Path, **changes) -> PretrainConfig:
    """ResNet-18 (CIFAR stem) at 16 px, narrow heads, batch 20: 10 steps an epoch, 2 epochs, kNN every epoch."""
    base = dict(arch="resnet18", cifar_stem=True, data=str(data), dataset="cifar10", image_size=16, epochs=2,
                batch_size=20, lr=0.05, proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64, log_every=5, knn_every=1,
                knn_k=20, out=str(out), wandb="disabled", cache_dir=str(out.parent / "cache"), device="cpu",
                compile=False, deterministic=True)
    return PretrainConfig(**{**base, **changes})


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def probe_run(data, tmp_path_factory) -> Path:
    """A whole 20-step BYOL+STS run with the online probe (on by default), kNN after epochs 1 and 2; at 32 px,
    the size the kNN monitor and the probe are measured at (at 16 px, features of 32 px test images do not
    look like those of the 16 px training crops)."""
    out = tmp_path_factory.mktemp("probe") / "run"
    Trainer(small(data, out, image_size=32)).fit()
    return out


# --------------------------------------------------------------------------------------- preview


def test_views_preview_is_the_pipelines_first_batch(probe_run):
    from fastse.engine import launch as ddp
    from fastse.engine.preview import read_png, view_grid
    from fastse.pretrain.data import build_data as _build_data

    picture = read_png(probe_run / "views.png")
    config = PretrainConfig(**json.loads((probe_run / "run.json").read_text())["config"])
    loader, *_ = _build_data(config, ddp.launch_env("cpu"), torch.float32)  # the same seed: the same batches
    loader.set_epoch(0)
    views, _ = next(iter(loader))
    expected = view_grid(views, loader.recipe.mean, loader.recipe.std)
    assert picture.shape == expected.shape == (2 * 96 + 2, 8 * 96 + 7 * 2, 3)  # 2 views x 8 images, 32 px x 3
    assert np.array_equal(picture, expected)
    # denormalised: the view's pixels are the JPEG's colours, not normalised values around 0
    top_left = picture[:96:3, :96:3].astype(np.float32) / 255  # one pixel per block: the 32 x 32 crop
    again = (top_left - np.array(loader.recipe.mean)) / np.array(loader.recipe.std)
    assert np.allclose(again.transpose(2, 0, 1), views[0][0].numpy(), atol=1 / 255 / min(loader.recipe.std) + 1e-5)
    assert picture.std() > 20  # not a blank picture


def test_views_go_to_wandb_through_the_run_log(tmp_path):
    from fastse.engine.preview import write_views

    class Log:
        def __init__(self):
            self.images = []

        def image(self, key, path, *, step, caption=""):
            self.images.append((key, Path(path).name, step))

    class Recipe:
        mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    log = Log()
    views = (torch.zeros(4, 3, 32, 32), torch.ones(4, 3, 32, 32))
    assert write_views(tmp_path, views, Recipe(), log) == tmp_path / "views.png"
    assert log.images == [("views", "views.png", 0)]
    assert write_views(tmp_path, views, Recipe(), log) is None  # kept: a resumed run does not redraw it


# ----------------------------------------------------------------------------------------- probe


def test_probe_learns_above_chance_and_is_logged_at_every_knn_check(probe_run):
    lines = _lines(probe_run)
    checks = [m for m in lines if "knn_top1" in m]
    assert [m["step"] for m in checks] == [10, 20] and all("probe_top1" in m for m in checks)
    assert checks[-1]["probe_top1"] > 13, checks  # 10 classes, 200 test images: chance is 10 % (std 2.1)
    losses = [m["probe_loss"] for m in lines if "probe_loss" in m]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    groups, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(probe_run))
    assert set(groups["probe"]) >= {"linear.weight", "linear.bias", "norm.running_mean"}
    assert groups["probe"]["linear.weight"].shape == (10, 512) and meta["probe"]["num_classes"] == 10


def test_probe_gradients_never_reach_the_backbone(data, tmp_path):
    trainer = Trainer(small(data, tmp_path / "run", max_steps=1))
    try:
        loader = trainer.train_loader
        loader.set_epoch(0)
        views, labels = next(iter(loader))
        trainer.train_step(views)
        features = trainer.method.features
        assert features is not None and not features.requires_grad and features.shape == (20, 512)
        model = {k: v.clone() for k, v in trainer.method.state_dict().items()}
        grads = {n: p.grad.clone() for n, p in trainer.method.named_parameters() if p.grad is not None}
        probe_before = trainer.probe.linear.weight.clone()
        trainer.probe_step(labels)
        assert not torch.equal(trainer.probe.linear.weight, probe_before)  # the probe learned
        assert all(torch.equal(v, model[k]) for k, v in trainer.method.state_dict().items())
        assert all(torch.equal(p.grad, grads[n]) for n, p in trainer.method.named_parameters() if p.grad is not None)
        probe_params = {id(p) for p in trainer.probe.linear.parameters()}
        assert not probe_params & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert trainer.method.features is None  # released for the next step
    finally:
        trainer.close()


def test_the_probe_changes_nothing_of_the_training(data, tmp_path):
    """Teacher and student after 4 steps are bit for bit those of the same run without the probe."""
    states = []
    for probe in (True, False):
        config = small(data, tmp_path / f"run-{probe}", online_probe=probe, max_steps=4, knn_every=0, log_every=2)
        trainer = Trainer(config)
        trainer.fit()
        states.append(trainer.method.state_dict())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())


def test_resume_keeps_the_probe_and_an_old_checkpoint_starts_it_fresh(data, tmp_path, capsys):
    out = tmp_path / "run"
    Trainer(small(data, out, max_steps=3, knn_every=0, log_every=3)).fit()
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))[0]["probe"]
    resumed = Trainer(small(data, out, max_steps=6, knn_every=0, log_every=3), resume=True)
    try:
        for k, v in resumed.probe.state()[0].items():
            assert torch.equal(v, saved[k]), k
    finally:
        resumed.close()
    assert "probe starts fresh" not in capsys.readouterr().out
    # a checkpoint as fastse wrote them before the probe: no probe group, no probe settings
    latest = ckpt.latest_checkpoint(out)
    meta = json.loads((latest / ckpt.META).read_text())
    for key in ("online_probe", "probe_lr", "monitor"):
        del meta["config"][key]
    del meta["probe"], meta["files"]["probe.safetensors"]
    (latest / "probe.safetensors").unlink()
    (latest / ckpt.META).write_text(json.dumps(meta))
    result = Trainer(small(data, out, max_steps=6, knn_every=0, log_every=3), resume=True).fit()
    assert result["step"] == 6
    printed = capsys.readouterr().out
    assert "the checkpoint holds no online probe" in printed and "the online probe starts fresh at step 3" in printed
    assert "resuming with changed settings" not in printed  # the new settings change nothing trained
    assert "probe" in ckpt.load_checkpoint(ckpt.latest_checkpoint(out))[0]  # and saved from then on


def test_no_online_probe_and_a_run_without_labels_have_none(data, tmp_path):
    trainer = Trainer(small(data, tmp_path / "run", online_probe=False, monitor="knn_top1"))
    try:
        assert trainer.probe is None and not trainer.method.keep_features
    finally:
        trainer.close()
    with pytest.raises(ValueError, match="monitor='probe_top1' needs the online probe"):
        small(data, tmp_path / "x", online_probe=False, monitor="probe_top1").validate()


# ------------------------------------------------------------------------------------------ best/


def test_best_holds_the_best_knn_check(probe_run):
    checks = [m for m in _lines(probe_run) if "knn_top1" in m]
    found = ckpt.best_checkpoint(probe_run)
    assert found is not None
    path, meta = found
    best = max(checks, key=lambda m: (m["knn_top1"], -m["step"]))  # the first of equals
    assert meta["best"]["metric"] == "knn_top1" and meta["best"]["value"] == best["knn_top1"]
    assert meta["step"] == meta["best"]["step"] == best["step"]
    assert {f"{g}.safetensors" for g in ("student", "teacher", "optimizer", "rng", "probe")} <= set(meta["files"])
    backbone = load_backbone(path / "backbone.safetensors")  # checksum verified
    teacher = ckpt.load_checkpoint(path)[0]["teacher"]
    assert all(torch.equal(v, teacher[f"backbone.{k}"]) for k, v in backbone.state_dict().items())
    assert len(list((probe_run / "checkpoints").glob("step-*"))) <= 3  # the last K are kept apart from it


def test_save_best_replaces_atomically_and_a_torn_swap_is_undone(tmp_path):
    t = {"w": torch.arange(4.0)}
    first = ckpt.save_best(tmp_path, 10, {"teacher": t}, {"best": {"metric": "knn_top1", "value": 50.0}})
    assert ckpt.best_checkpoint(tmp_path)[1]["best"]["value"] == 50.0
    ckpt.save_best(tmp_path, 20, {"teacher": {"w": t["w"] * 2}}, {"best": {"metric": "knn_top1", "value": 60.0}})
    path, meta = ckpt.best_checkpoint(tmp_path)
    assert path == first and meta["step"] == 20 and not (tmp_path / ".best-old").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temp folders left
    (tmp_path / "best").rename(tmp_path / ".best-old")  # a crash between the two renames of a replacement
    assert ckpt.best_checkpoint(tmp_path)[1]["step"] == 20 and (tmp_path / "best").is_dir()


def test_best_by_the_probe_and_resume_keeps_the_record(data, tmp_path):
    out = tmp_path / "run"
    Trainer(small(data, out, monitor="probe_top1", epochs=2, max_steps=10)).fit()
    value = ckpt.best_checkpoint(out)[1]["best"]["value"]
    trainer = Trainer(small(data, out, monitor="probe_top1", epochs=2), resume=True)
    try:
        assert trainer.best_value == value
    finally:
        trainer.close()


# ---------------------------------------------------------------------------------------- config


def _print_config(*args: str):
    return CliRunner().invoke(main, ["pretrain", *args, "--print-config"])


def test_a_run_json_replays_the_run(probe_run, data, tmp_path):
    replay = tmp_path / "replay"
    result = _print_config("--config", str(probe_run / "run.json"), "--out", str(replay))
    assert result.exit_code == 0, result.output
    (tmp_path / "printed.toml").write_text(result.output)
    _, printed = read_config_file(tmp_path / "printed.toml", PretrainConfig)
    original = json.loads((probe_run / "run.json").read_text())["config"]
    resolved = {k: v for k, v in original.items() if v is not None}
    assert printed == {**resolved, "out": str(replay)}
    # the folder names its run.json; training from it trains the same (the first 4 steps, bit for bit)
    result = CliRunner().invoke(main, ["pretrain", "--config", str(probe_run), "--out", str(replay), "--max-steps",
                                       "4", "--knn-every", "0"])
    assert result.exit_code == 0, result.output
    again = json.loads((replay / "run.json").read_text())["config"]
    assert {k: v for k, v in again.items() if k not in ("out", "max_steps", "knn_every")} == \
           {k: v for k, v in original.items() if k not in ("out", "max_steps", "knn_every")}
    reference = tmp_path / "reference"
    Trainer(small(data, reference, image_size=32, max_steps=4, knn_every=0)).fit()
    a, b = (ckpt.load_checkpoint(ckpt.latest_checkpoint(r))[0]["teacher"] for r in (replay, reference))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_flags_override_the_file_and_the_file_the_preset(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('preset = "byol-cifar10"\nepochs = 7\nlr = 1\nwandb_tags = ["a", "b"]\nonline_probe = false\n')
    result = _print_config("--config", str(file), "--epochs", "9")
    assert result.exit_code == 0, result.output
    (tmp_path / "out.toml").write_text(result.output)
    _, c = read_config_file(tmp_path / "out.toml", PretrainConfig)
    assert (c["epochs"], c["lr"], c["arch"], c["batch_size"]) == (9, 1.0, "resnet18", 512)  # flag, file, preset
    assert c["online_probe"] is False and c["wandb_tags"] == ["a", "b"]
    result = _print_config("--config", str(file), "--preset", "mocov2-cifar10")  # --preset wins over the file's
    assert result.exit_code == 0 and 'method = "mocov2"' in result.output
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"data": "cifar10", "keep_prob": 0.4, "image_size": None}))
    result = _print_config("--config", str(json_file))
    assert result.exit_code == 0 and "keep_prob = 0.4" in result.output


def test_print_config_round_trips(tmp_path):
    for args in (["--preset", "byol-cifar10"], ["--preset", "mocov2-imagenet", "--data", "/x", "--monitor", "none"]):
        result = _print_config(*args)
        assert result.exit_code == 0, result.output
        (tmp_path / "c.toml").write_text(result.output)
        preset, settings = read_config_file(tmp_path / "c.toml", PretrainConfig)
        config = PretrainConfig(**settings)
        assert preset is None and result.output.endswith(config_toml(config))  # read back: the same settings


@pytest.mark.parametrize("text,message", [
    ("keep_prb = 0.5\n", "unknown setting 'keep_prb' (not a setting of PretrainConfig); did you mean 'keep_prob'?"),
    ("[pretrain]\nepochs = 3\n", "unknown setting 'pretrain'"),
    ('epochs = "ten"\n', "epochs='ten' must be int"),
    ("compile = 1\n", "compile=1 must be bool or null"),
    ("epochs = 3\nepochs = 4\n", "not valid TOML"),
    ('preset = "simclr"\n', "unknown preset 'simclr'"),
])
def test_bad_config_files_exit_2_with_one_line(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    result = CliRunner().invoke(main, ["pretrain", "--config", str(file), "--data", "cifar10"])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and message in error[0], result.output
    assert "Traceback" not in result.output


def test_other_config_files_are_refused(tmp_path):
    for name in ("c.yaml", "missing.toml"):
        result = CliRunner().invoke(main, ["pretrain", "--config", str(tmp_path / name), "--data", "cifar10"])
        assert result.exit_code == 2, result.output
        assert (".toml or .json" if name.endswith(".yaml") else "cannot be read") in result.output


def test_semi_reads_config_files_too(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text('preset = "fixmatch-cifar100"\nnum_labels = 400\n')
    result = CliRunner().invoke(main, ["semi", "--config", str(file), "--print-config"])
    assert result.exit_code == 0, result.output
    assert "widen = 8" in result.output and "num_labels = 400" in result.output
    file.write_text("knn_k = 3\n")  # a pretraining setting
    result = CliRunner().invoke(main, ["semi", "--config", str(file), "--data", "cifar10"])
    assert result.exit_code == 2 and "unknown setting 'knn_k' (not a setting of SemiConfig)" in result.output


def test_cli_monitors_match_the_library():
    assert cli.MONITORS == MONITORS


def test_report_plots_the_teacher_statistics_and_tables_the_probe(probe_run, tmp_path):
    from fastse.report import build_tables, load_run, write_report

    table = build_tables([load_run(probe_run)])[0]
    assert ("probe_top1", "online probe top-1") in table.columns()
    xs, momenta = load_run(probe_run).curve("momentum")
    assert xs == [0.5, 1.0, 1.5, 2.0] and 0.99 <= momenta[0] < momenta[-1] <= 1
    path, text = write_report([probe_run], tmp_path / "report")
    assert "online probe top-1 %" in text and (tmp_path / "report" / "pretrain-byol.png").stat().st_size > 0
    shutil.rmtree(tmp_path / "report")
