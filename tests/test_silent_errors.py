"""Faults that used to give a wrong result with exit 0 (issue 21, items 3 and 4), on real CIFAR-10 JPEGs:
folder links read twice or under another class, eval.json results replaced by smoke runs, a damaged
backbone evaluated, a resume on other images or another labeled split, and one odd image size switching
the recipe. Each is refused or reported now; what earlier versions wrote (eval.json of one result a kind,
a backbone without a checksum, a checkpoint that does not record its data) still loads, with a word."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastse.cli.main import main
from fastse.pipelines.datasets import DataError, ImageFolderIndex, scan_image_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastse.checkpoints import CheckpointError, latest_checkpoint
from fastse.models import resnet_backbone
from fastse.models.export import export_backbone, load_backbone
from fastse.pretrain.config import PretrainConfig
from fastse.report import build_tables, load_run, markdown

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def copy_classes(src: Path, dest: Path, classes: list[str], n: int, *, offset: int = 0) -> None:
    """`n` real JPEGs of each class of `src` into dest/<class>/, named as src's first `n` but holding the images
    `offset` further on (offset 0: the same images)."""
    for cls in classes:
        (dest / cls).mkdir(parents=True)
        files = sorted((src / cls).iterdir())
        for name, content in zip(files[:n], files[offset:offset + n], strict=True):
            shutil.copy(content, dest / cls / name.name)


# ------------------------------------------------------------------------------------- folder links


def test_folder_links_never_read_a_file_twice_or_under_another_class(cifar10_dir, tmp_path):
    train = tmp_path / "data" / "train"
    copy_classes(cifar10_dir / "train", train, ["airplane", "automobile"], 3)
    copy_classes(cifar10_dir / "train", tmp_path / "elsewhere", ["bird"], 2)
    links = {"airplane/loop": "..", "automobile/self": ".", "airplane/more": str(tmp_path / "elsewhere" / "bird"),
             "automobile/more": str(tmp_path / "elsewhere")}
    for link, target in links.items():
        os.symlink(target, train / link)

    def each_file_once_under_its_class() -> ImageFolderIndex:
        index = scan_image_folder(train)
        real = [os.path.realpath(f) for f in index.files]
        assert len(real) == len(set(real)) == 8  # 3 + 3 in the tree, 2 through the link out of it
        for path, label in zip(real, index.labels.tolist(), strict=True):
            expected = "airplane" if "/elsewhere/" in path else Path(path).parent.name
            assert index.classes[label] == expected, path
        return index

    index = each_file_once_under_its_class()
    assert sorted(str(p.relative_to(train)) for p, _ in index.unfollowed) == [  # more/: only bird/ was read
        "airplane/loop", "automobile/more/bird", "automobile/self"]
    assert "did not follow 3 folder link(s)" in index.summary()
    os.symlink("../airplane", train / "automobile" / "planes")  # into another class folder
    assert train / "automobile" / "planes" in [p for p, _ in each_file_once_under_its_class().unfollowed]

    checked = cli("data", "check", str(tmp_path / "data"))
    assert checked.exit_code == 0, checked.output
    for link in ("airplane/loop", "automobile/self", "automobile/planes", "automobile/more/bird"):
        assert f"{train / link}: not followed: it leads to" in checked.output
    assert "a folder holding it (a cycle)" in checked.output and "inside the data tree" in checked.output
    assert f"already read as {train / 'airplane/more'}" in checked.output

    os.symlink(train / "airplane", train / "planes")  # a class folder that is another one
    with pytest.raises(DataError, match="overlaps class folder airplane"):
        scan_image_folder(train)


# ------------------------------------------------------------------------------------------ eval.json


def test_eval_json_keeps_every_result_and_the_report_tables_the_teachers_on_all_the_data(tiny_run, tiny_cifar,
                                                                                          tmp_path):
    from fastse.results import read_results

    run = shutil.copytree(tiny_run, tmp_path / "run")
    old = json.loads((REPO / "docs/results/sts_vs_ema/byol-ema-s0/eval.json").read_text())  # one result a kind
    (run / "eval.json").write_text(json.dumps(old))
    data = ["--checkpoint", str(run), "--data", str(tiny_cifar), "--dataset", "cifar10", "--k", "10",
            "--device", "cpu", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache")]
    for extra in ([], ["--limit", "20"], ["--which", "student"]):
        result = cli("knn", *data, *extra)
        assert result.exit_code == 0, result.output
    assert "(student, " in result.output and "kept; the report tables the teacher's on all data" in result.output

    results = read_results(run)
    assert [(r["kind"], r["which"], r["limit"]) for r in results] == [
        ("fast", "teacher", None), ("knn", "teacher", None), ("knn", "teacher", 20), ("knn", "student", None)]
    assert all(r["time"] for r in results)
    full, smoke, student = results[1:]
    loaded = load_run(run)
    assert loaded.evals == {"fast": results[0], "knn": full}
    text = markdown(build_tables([loaded]), "t")
    header, _, row = (line.split(" | ") for line in text.splitlines() if line.startswith("|"))
    columns = dict(zip(header, row, strict=True))
    assert columns["kNN top-1 (fastse knn) %"] == f"{full['top1']:.2f}"
    assert columns["linear fast top-1 %"] == f"{old['fast']['top1']:.2f}"
    assert f"not in the table: kNN top-1 (fastse knn) {smoke['top1']:.2f} (--limit 20, " in text
    assert f"not in the table: kNN top-1 (fastse knn) {student['top1']:.2f} (student, " in text


# ------------------------------------------------------------------------------------------- backbone


def test_a_damaged_backbone_is_refused_and_one_without_a_checksum_loads_with_a_warning(tiny_cifar, tmp_path,
                                                                                       caplog):
    file = export_backbone(tmp_path / "good", resnet_backbone("resnet18", cifar_stem=True))
    damaged = tmp_path / "damaged" / "backbone.safetensors"
    damaged.parent.mkdir()
    data = bytearray(file.read_bytes())
    data[-64] ^= 0x10  # one bit of the last tensor's data
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 of its tensors does not match"):
        load_backbone(damaged)
    result = cli("knn", "--checkpoint", str(damaged), "--data", str(tiny_cifar), "--device", "cpu",
                 "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(damaged) in errors[0] and "sha256" in errors[0], result.output
    assert not (damaged.parent / "eval.json").exists()

    old = tmp_path / "old" / "backbone.safetensors"  # as exported before the checksum
    old.parent.mkdir()
    with safe_open(file, "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    save_file(load_file(file), old, metadata=meta)
    with caplog.at_level("WARNING", logger="fastse.checkpoints"):
        net = load_backbone(old)
    assert "no checksum" in caplog.text and str(old) in caplog.text
    saved = load_file(file)
    assert all(np.array_equal(v.numpy(), saved[k].numpy()) for k, v in net.state_dict().items())


# --------------------------------------------------------------------------------------------- resume


def test_resume_refuses_other_images_says_when_they_moved_and_goes_on_from_an_old_checkpoint(
        tiny_run, tiny_cifar, cifar10_dir, tmp_path, capsys):
    from fastse.pretrain.trainer import Trainer

    meta_file = latest_checkpoint(tiny_run) / "meta.json"
    config = PretrainConfig(**json.loads(meta_file.read_text())["config"]).replace(max_steps=5)
    other = tmp_path / "other"  # the same count, class folders, file names and pixel sizes; other images
    for split, n in (("train", 10), ("test", 4)):
        classes = sorted(p.name for p in (tiny_cifar / split).iterdir())
        copy_classes(cifar10_dir / split, other / split, classes, n, offset=n)
    run = shutil.copytree(tiny_run, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"was trained on 100 images of .*, this run reads 100 of .*other"):
        Trainer(config.replace(out=str(run), data=str(other)), resume=True)

    moved = shutil.copytree(tiny_cifar, tmp_path / "moved")
    capsys.readouterr()
    assert Trainer(config.replace(out=str(run), data=str(moved)), resume=True).fit()["step"] == 5
    assert f"the data moved from {tiny_cifar}/train to {moved}/train (the same 100 images)" in capsys.readouterr().out

    old = shutil.copytree(tiny_run, tmp_path / "old")  # a checkpoint written before they recorded their data
    old_meta = latest_checkpoint(old) / "meta.json"
    meta = json.loads(old_meta.read_text())
    del meta["data"]
    old_meta.write_text(json.dumps(meta))
    assert Trainer(config.replace(out=str(old)), resume=True).fit()["step"] == 5
    assert "does not record its data (written by an older fastse): not checked" in capsys.readouterr().out


def test_semi_resume_refuses_another_split_seed_or_other_images(tiny_cifar, cifar10_dir, tmp_path):
    from fastse.semi.config import SemiConfig
    from fastse.semi.trainer import SemiTrainer, train

    out = tmp_path / "run"
    config = SemiConfig(data=str(tiny_cifar), dataset="cifar10", num_labels=20, depth=10, widen=1, labeled_batch=8,
                        mu=2, total_steps=4, max_steps=2, eval_every=2, log_every=2, ckpt_every=2, out=str(out),
                        wandb="disabled", device="cpu", compile=False, cache_dir=str(tmp_path / "cache"))
    train(config)
    split = (out / "labeled_split.json").read_text()
    with pytest.raises(CheckpointError, match="labeled split drawn with split seed 0 .* asks for split seed 5"):
        SemiTrainer(config.replace(split_seed=5, max_steps=4), resume=True)
    with pytest.raises(CheckpointError, match="labeled split drawn with split seed 0 .* asks for split seed 3"):
        SemiTrainer(config.replace(seed=3, max_steps=4), resume=True)  # the split seed follows the seed
    other = tmp_path / "other"
    for split_name, n in (("train", 10), ("test", 4)):
        classes = sorted(p.name for p in (tiny_cifar / split_name).iterdir())
        copy_classes(cifar10_dir / split_name, other / split_name, classes, n, offset=n)
    with pytest.raises(CheckpointError, match="was trained on 100 images of"):
        SemiTrainer(config.replace(data=str(other), max_steps=4), resume=True)
    meta = json.loads((latest_checkpoint(out) / "meta.json").read_text())
    assert meta["config"]["split_seed"] is None and (out / "labeled_split.json").read_text() == split
    assert train(config.replace(split_seed=0, max_steps=4), resume=True)["step"] == 4  # the same split seed


# ---------------------------------------------------------------------------------------- image sizes


@pytest.mark.parametrize("odd_size", [(64, 64), (16, 8000)], ids=["64px", "8000px"])
def test_one_image_of_another_size_is_refused_by_name_not_a_switch_of_recipe(tiny_cifar, tmp_path, odd_size):
    from fastse.eval.linear import eval_data
    from fastse.semi.config import SemiConfig
    from fastse.semi.trainer import SemiTrainer

    data = shutil.copytree(tiny_cifar, tmp_path / "data")
    odd = data / "train" / "airplane" / "odd.jpg"
    Image.new("RGB", odd_size[::-1], (120, 80, 40)).save(odd)
    h, w = odd_size
    refusal = rf"1 of 1[04]1 images are not 32x32 px, the size of the data \(median side 32 px(.|\n)*{odd}: {h}x{w} px"

    out = tmp_path / "run"
    result = cli("pretrain", "--preset", "byol-cifar10", "--data", str(data), "--batch-size", "20", "--epochs", "1",
                 "--max-steps", "1", "--proj-hidden-dim", "64", "--pred-hidden-dim", "64", "--proj-dim", "32",
                 "--device", "cpu", "--no-compile", "--wandb", "disabled", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert re.search(refusal, result.output), result.output
    assert not (out / "checkpoints").exists() and not (out / "backbone.safetensors").exists()
    with pytest.raises(DataError, match=refusal):
        eval_data(data, dataset="cifar10", cache_dir=str(tmp_path / "cache"))
    semi = SemiConfig(data=str(data), dataset="cifar10", num_labels=20, depth=10, widen=1, labeled_batch=8, mu=2,
                      total_steps=2, out=str(tmp_path / "semi"), wandb="disabled", device="cpu", compile=False,
                      cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=refusal):
        SemiTrainer(semi)

    checked = cli("data", "check", str(data))
    assert checked.exit_code == 0, checked.output
    longest = max(h, w)
    assert ("train: 101 images in 10 classes" in checked.output
            and f"image sizes: 2 sizes, longer side 32-{longest} px, most often 32x32 px (100 images); median "
                "longer side 32 px: small-image recipes at 32 px" in checked.output
            and f"1 outlier(s), not 32x32 px: refused for training:\n    {odd}: {h}x{w} px" in checked.output)
    assert "test: 40 images in 10 classes" in checked.output and "image sizes: all 32x32 px" in checked.output


def test_the_size_rule_follows_the_median_says_what_it_chose_and_reports_outliers(tiny_cifar, tmp_path):
    from fastse.pipelines.sizes import image_sizes

    from fastse.engine import launch as ddp
    from fastse.pretrain.data import build_data as _build_data

    def index(sides: list[tuple[int, int]]) -> ImageFolderIndex:
        n = len(sides)
        return ImageFolderIndex(root=Path("/data/x"), classes=["a"], labels=np.zeros(n, dtype=np.int64),
                                files=[Path(f"/data/x/a/{i}.jpg") for i in range(n)],
                                sizes=np.asarray(sides, dtype=np.int32))

    large = image_sizes(index([(375, 500)] * 6 + [(480, 640)] * 4 + [(32, 32), (6000, 8000)]))
    assert (large.side, large.small, large.default_size) == (500, False, 224)
    assert large.check() is large  # large images take any size (random resized crops)
    assert large.outliers().tolist() == [10, 11]
    assert "2 outlier(s), over 4x off the median side:\n  /data/x/a/10.jpg: 32x32 px" in large.describe()
    with pytest.raises(DataError, match="6 of 12 images are not 375x500 px, .* held in memory at one size"):
        large.check(one_size=True)  # what fastse semi needs

    small = image_sizes(index([(32, 32)] * 9 + [(28, 28)]), index([(32, 32), (40, 40)]))  # train, then test
    assert (small.side, small.small, small.shape, small.default_size) == (32, True, (32, 32), 32)
    with pytest.raises(DataError, match=r"2 of 12 images(.|\n)*/a/9.jpg: 28x28 px(.|\n)*/a/1.jpg: 40x40 px"):
        small.check()

    config = PretrainConfig(method="byol", arch="resnet18", cifar_stem=True, data=str(tiny_cifar), batch_size=20,
                            epochs=1, device="cpu", cache_dir=str(tmp_path / "cache"))
    loader, _, summary, record = _build_data(config, ddp.launch_env("cpu"), torch.float32)
    assert loader.recipe.size == 32 and "at 32 px (small images (median side 32 px))" in summary
    assert record["images"] == 100 and len(record["fingerprint"]) == 16
