"""Datasets: real CIFAR-10 JPEGs, synthetic trees for every bad-data case, archives, torchvision's
CIFAR format converted offline, labeled splits, statistics."""

from __future__ import annotations

import hashlib
import io
import pickle
import shutil
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets
import torchvision.datasets.cifar
from fastse.pipelines import datasets as D
from fastse.pipelines.datasets import (
    DataError,
    dataset_stats,
    labeled_split,
    load_split,
    load_uint8,
    resolve_data,
    save_split,
    scan_image_folder,
)
from fastse.pipelines.recipes import CIFAR10_MEAN, CIFAR10_STD
from PIL import Image

COLOUR = (200, 50, 100)


def jpeg(path: Path, pixels=COLOUR, size=(32, 32), mode="RGB", fmt="JPEG") -> Path:
    """A solid (or given) image written as `mode` in `fmt`; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.broadcast_to(np.asarray(pixels, np.uint8), (*size, 3)) if len(np.shape(pixels)) < 3 else pixels
    Image.fromarray(np.ascontiguousarray(arr)).convert(mode).save(path, format=fmt, quality=95)
    return path


def tree(root: Path, n_per_class=3, classes=("cat", "dog")) -> Path:
    for c in classes:
        for i in range(n_per_class):
            jpeg(root / c / f"{i}.jpg", pixels=(10 * i, 100, 50))
    return root


# ---------------------------------------------------------------------------------------- real CIFAR


def test_scan_real_cifar_train(cifar10_dir):
    index = scan_image_folder(cifar10_dir, split="train")
    assert len(index) == 50_000 and index.classes[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(index.labels).tolist() == [5000] * 10
    assert index.labels.dtype == np.int64 and (index.sizes == 32).all()
    assert index.counts == {"jpeg": 50_000, "png": 0, "gray": 0, "cmyk": 0, "ignored": 0, "skipped": 0}
    for i in range(0, 50_000, 997):
        assert index.files[i].is_absolute() and index.files[i].parent.name == index.classes[index.labels[i]]


def test_load_uint8_real_cifar_and_cache_hit(cifar10_dir, tmp_path, monkeypatch):
    classes = sorted(p.name for p in (cifar10_dir / "train").iterdir())
    index = scan_image_folder(cifar10_dir, split="test", classes=classes)
    x, y = load_uint8(index, cache_dir=tmp_path)
    assert x.shape == (10_000, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(y, index.labels)
    for i in (0, 4321, 9999):
        np.testing.assert_array_equal(x[i], np.asarray(Image.open(index.files[i]).convert("RGB")))
    assert 100 < x.mean() < 140 and x.std() > 50  # real photos, not an unfilled buffer
    cached = list((tmp_path / "arrays").glob("*.npy"))
    assert len(cached) == 1 and len(list((tmp_path / "arrays").glob("*.json"))) == 1

    monkeypatch.setattr(D, "_parallel", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    x2, y2 = load_uint8(index, cache_dir=tmp_path)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    y2[0] = -1  # the caller owns what it gets
    assert load_uint8(index, cache_dir=tmp_path)[1][0] == y[0]


def test_cache_invalidated_when_a_file_changes(tmp_path):
    root = tree(tmp_path / "data")
    index = scan_image_folder(root)
    x, _ = load_uint8(index, cache_dir=tmp_path / "cache")
    jpeg(index.files[0], pixels=(0, 0, 255))
    x2, _ = load_uint8(scan_image_folder(root), cache_dir=tmp_path / "cache")
    assert x2[0, ..., 2].mean() > 200 and x[0, ..., 2].mean() < 100
    assert len(list((tmp_path / "cache/arrays").glob("*.npy"))) == 2


def test_labeled_split_balanced_stable_and_saved(cifar10_dir, tmp_path):
    index = scan_image_folder(cifar10_dir, split="train")
    for n in (40, 250, 4000):
        idx = labeled_split(index.labels, n, seed=1)
        assert idx.dtype == np.int64 and len(idx) == n and len(np.unique(idx)) == n
        assert (np.diff(idx) > 0).all()  # sorted
        assert np.bincount(index.labels[idx], minlength=10).tolist() == [n // 10] * 10
    a, b, c = (labeled_split(index.labels, 40, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert len(np.intersect1d(a, c)) < 10

    written = save_split(tmp_path, a, index.files)  # a run folder
    assert written == tmp_path / "labeled_split.json"
    assert '"file": "airplane/' in written.read_text()
    np.testing.assert_array_equal(load_split(tmp_path, index.files), a)
    np.testing.assert_array_equal(load_split(written), a)
    with pytest.raises(DataError, match="labeled_split.json"):
        load_split(written, index.files[1:])  # a different dataset: each index names another file


def test_labeled_split_refuses_unbalanced_or_too_many():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        labeled_split(labels, 45, seed=0)
    with pytest.raises(ValueError, match="class 0 has 5"):
        labeled_split(labels, 60, seed=0)
    assert len(labeled_split(labels, 50, seed=0)) == 50  # every sample


def test_dataset_stats(cifar10_dir, tmp_path):
    assert dataset_stats("cifar10") == (CIFAR10_MEAN, CIFAR10_STD)
    mean, std = dataset_stats(cifar10_dir, cache_dir=tmp_path, max_images=2000)
    # JPEG q75 and a 2,000-image sample: within 0.01 of the published values of the lossless arrays
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=0.01)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=0.01)
    # a synthetic set with exact answers: half pure red, half pure blue (PNG, lossless)
    for i in range(4):
        jpeg(tmp_path / "rb/red" / f"{i}.png", pixels=(255, 0, 0), fmt="PNG")
        jpeg(tmp_path / "rb/blue" / f"{i}.png", pixels=(0, 0, 255), fmt="PNG")
    mean, std = dataset_stats(tmp_path / "rb", cache_dir=tmp_path)
    np.testing.assert_allclose(mean, (0.5, 0.0, 0.5))
    np.testing.assert_allclose(std, (0.5, 0.0, 0.5))
    assert len(list((tmp_path / "stats").glob("*.json"))) == 2


# ------------------------------------------------------------------------------------------ bad data


def test_gray_cmyk_png_and_stray_files_are_converted_and_counted(tmp_path, caplog):
    root = tree(tmp_path / "data")
    gray = jpeg(root / "cat/gray.jpg", mode="L")
    cmyk = jpeg(root / "cat/cmyk.jpg", mode="CMYK")
    png = jpeg(root / "dog/disguised.JPEG", fmt="PNG")  # a PNG named like a JPEG (as in ImageNet)
    (root / "dog/notes.txt").write_text("not an image")
    (root / "dog/.DS_Store").write_bytes(b"\0" * 64)
    (root / "cat/._0.jpg").write_bytes(b"\0" * 64)  # macOS resource fork: hidden, ignored
    with caplog.at_level("INFO", logger="fastse.pipelines.datasets"):
        index = scan_image_folder(root)
    assert index.counts == {"jpeg": 8, "png": 1, "gray": 1, "cmyk": 1, "ignored": 3, "skipped": 0}
    assert "gray 1, cmyk 1" in caplog.text and "ignored 3 non-image files" in caplog.text
    assert len(index) == 9 and {gray, cmyk, png} <= set(index.files)
    x, _ = load_uint8(index, cache_dir=tmp_path / "cache")
    pixel = {f: x[i].reshape(-1, 3).mean(0) for i, f in enumerate(index.files)}
    luma = 0.299 * COLOUR[0] + 0.587 * COLOUR[1] + 0.114 * COLOUR[2]
    np.testing.assert_allclose(pixel[gray], [luma] * 3, atol=3)  # gray replicated to RGB
    np.testing.assert_allclose(pixel[cmyk], COLOUR, atol=3)  # CMYK back to the colour it was made from
    np.testing.assert_array_equal(pixel[png], COLOUR)  # PNG is lossless


def test_large_headers_and_exif_orientation(tmp_path):
    root = tree(tmp_path / "data")
    big_header = root / "cat/icc.jpg"  # a 20 KB APP2 segment: the header walk reads past its first 4 KB
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(big_header, icc_profile=bytes(20_000))
    index = scan_image_folder(root)
    assert tuple(index.sizes[index.files.index(big_header)]) == (48, 64)
    big_header.unlink()
    upside_down = root / "dog/rotated.jpg"
    top_white = np.zeros((32, 32, 3), np.uint8)
    top_white[:16] = 255
    exif = Image.Exif()
    exif[0x0112] = 3  # orientation: rotate 180 degrees, as DALI's decoders apply by default
    Image.fromarray(top_white).save(upside_down, exif=exif, quality=95)
    index = scan_image_folder(root)
    x, _ = load_uint8(index, cache_dir=tmp_path / "cache")
    upright = x[index.files.index(upside_down)].astype(int)
    assert upright[:16].mean() < 10 and upright[16:].mean() > 245


@pytest.mark.parametrize(
    "case,reason",
    [
        ("random_bytes", "neither JPEG nor PNG"),
        ("empty_file", "empty file"),
        ("truncated_scan", "truncated"),
        ("truncated_header", "truncated JPEG header"),
        ("truncated_png", "truncated"),
        ("jpeg_without_frame", "before any frame header"),
    ],
)
def test_corrupt_files_refused_with_path_or_skipped_with_count(tmp_path, case, reason):
    root = tree(tmp_path / "data")
    bad = root / "dog" / "bad.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    big = jpeg(tmp_path / "big.jpg", pixels=noise, size=(96, 96)).read_bytes()
    small = (root / "dog/0.jpg").read_bytes()
    if case == "random_bytes":
        bad.write_bytes(np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8).tobytes())
    elif case == "empty_file":
        bad.write_bytes(b"")
    elif case == "truncated_scan":
        bad.write_bytes(big[: len(big) * 3 // 4])
    elif case == "truncated_header":
        bad.write_bytes(small[:200])
    elif case == "truncated_png":
        bad = jpeg(root / "dog/bad.png", fmt="PNG", pixels=noise, size=(96, 96))
        bad.write_bytes(bad.read_bytes()[:-40])
    elif case == "jpeg_without_frame":
        sos = small.index(b"\xff\xda")
        sof = small.index(b"\xff\xc0")
        bad.write_bytes(small[:sof] + small[sos:])  # SOF0 segment (and what followed it) cut out
    with pytest.raises(DataError, match=reason) as err:
        scan_image_folder(root)
    assert str(bad) in str(err.value) and f"fastse data check {root.resolve()} --deep" in str(err.value)

    index = scan_image_folder(root, on_corrupt="skip")
    assert bad not in index.files and index.skipped == [bad]
    assert index.counts["skipped"] == 1 and len(index) == 6
    assert load_uint8(index, cache_dir=tmp_path / "cache")[0].shape == (6, 32, 32, 3)


def test_damage_inside_a_valid_structure_needs_a_decode(tmp_path):
    root = tree(tmp_path / "data")
    good = (root / "cat/1.jpg").read_bytes()
    dht = good.index(b"\xff\xc4")
    bad = root / "cat/bad_huffman.jpg"
    bad.write_bytes(good[: dht + 4] + b"\xff" * 16 + good[dht + 20 :])  # Huffman table counts wrecked
    index = scan_image_folder(root)  # the cheap check reads headers and end markers only
    assert bad in index.files
    with pytest.raises(DataError, match="bad_huffman.jpg: does not decode"):
        scan_image_folder(root, deep=True)
    assert bad not in scan_image_folder(root, deep=True, on_corrupt="skip").files
    with pytest.raises(DataError, match="bad_huffman.jpg: does not decode"):
        load_uint8(index, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache/arrays").glob("*.npy"))  # nothing half-written is left as a cache


def test_missing_empty_and_malformed_trees_are_refused_with_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}: does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'}: no class folders"):
        scan_image_folder(tmp_path / "empty")
    jpeg(tmp_path / "flat/a.jpg")  # images but no class folders
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")
    with pytest.raises(DataError, match="is not a folder"):
        scan_image_folder(tmp_path / "flat/a.jpg")
    root = tree(tmp_path / "data")
    with pytest.raises(DataError, match="data/train: does not exist"):
        scan_image_folder(root, split="train")
    (root / "empty_class").mkdir()
    (root / "text_only").mkdir()
    (root / "text_only/readme.txt").write_text("x")
    with pytest.raises(DataError, match="2 empty class folder") as err:
        scan_image_folder(root)
    assert str(root / "empty_class") in str(err.value) and str(root / "text_only") in str(err.value)


def test_unsupported_formats_and_unexpected_classes_are_refused(tmp_path):
    root = tree(tmp_path / "data")
    with pytest.raises(DataError, match=r"missing \['bird'\], extra \[\]"):
        scan_image_folder(root, classes=["bird", "cat", "dog"])
    webp = jpeg(root / "cat/x.webp", fmt="WEBP")
    with pytest.raises(DataError, match=f"{webp}: .webp is not read"):
        scan_image_folder(root)


def test_skipping_every_image_of_a_class_is_refused(tmp_path):
    root = tree(tmp_path / "data", n_per_class=1)
    (root / "cat/0.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"\['cat'\] hold no valid image"):
        scan_image_folder(root, on_corrupt="skip")


def test_mixed_sizes_refused_for_in_memory_loading(tmp_path):
    root = tree(tmp_path / "data")
    odd = jpeg(root / "dog/odd.jpg", size=(40, 32))
    index = scan_image_folder(root)
    assert tuple(index.sizes[index.files.index(odd)]) == (40, 32)
    with pytest.raises(DataError, match=f"{odd}: 40x32 px"):
        load_uint8(index, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------- sources


def _archive(src: Path, out: Path, arcname: str) -> Path:
    """Write `src` into a tar archive under `arcname` ('.' = top level), compressed per out's suffix."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        tar.add(src, arcname=arcname)
    data = raw.getvalue()
    if out.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    elif out.name.endswith(".gz"):
        import gzip

        data = gzip.compress(data)
    out.write_bytes(data)
    return out


@pytest.mark.parametrize(
    "suffix,arcname,zstd_binary",
    [
        (".tar.zst", ".", True),
        (".tar.zst", "wrapper", False),  # the zstandard module where no zstd binary exists
        (".tar.gz", "wrapper", True),
        (".tar", ".", True),
    ],
)
def test_archives_extracted_once(tmp_path, monkeypatch, suffix, arcname, zstd_binary):
    if zstd_binary and suffix == ".tar.zst" and not shutil.which("zstd"):
        pytest.skip("no zstd binary here")
    src = tmp_path / "src"
    tree(src / "train")
    tree(src / "test", n_per_class=1)
    archive = _archive(src, tmp_path / f"cifar-mini{suffix}", arcname)
    if not zstd_binary:
        monkeypatch.setattr(D.shutil, "which", lambda name: None)
        monkeypatch.setattr(D.subprocess, "Popen", lambda *a, **k: pytest.fail("zstd binary used"))
    root = resolve_data(archive, cache_dir=tmp_path / "cache")
    assert root.parent == tmp_path / "cache/extracted" and (root / ".complete").is_file()
    assert len(scan_image_folder(root, split="train")) == 6
    assert len(scan_image_folder(root, split="test")) == 2
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left

    monkeypatch.setattr(D, "_untar", lambda *a: pytest.fail("extracted twice"))
    assert resolve_data(str(archive), cache_dir=tmp_path / "cache") == root


def test_archive_of_a_single_split_or_class_is_not_descended_into(tmp_path):
    tree(tmp_path / "s/train")
    cache = tmp_path / "cache"
    root = resolve_data(_archive(tmp_path / "s/train", tmp_path / "split.tar", "train"), cache_dir=cache)
    assert len(scan_image_folder(root, split="train")) == 6
    jpeg(tmp_path / "one/only_class/a.jpg")
    archive = _archive(tmp_path / "one/only_class", tmp_path / "one.tar", "only_class")
    root = resolve_data(archive, cache_dir=cache)
    assert scan_image_folder(root).classes == ["only_class"]


def test_bad_specs_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such folder or archive"):
        resolve_data(tmp_path / "missing.tar.zst")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not a folder or a"):
        resolve_data(tmp_path / "notes.txt")
    (tmp_path / "broken.tar.zst").write_bytes(b"definitely not zstd")
    with pytest.raises(DataError, match="broken.tar.zst"):
        resolve_data(tmp_path / "broken.tar.zst", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache/extracted").exists() or not any((tmp_path / "cache/extracted").iterdir())
    assert resolve_data(str(tmp_path)) == tmp_path.resolve()


def _smooth_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [n, 32, 32, 3] gradients with a random colour each: compress well, so JPEG q95 keeps them."""
    ramp = np.linspace(0.3, 1.0, 32)
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    return (base * ramp[None, :, None, None] * ramp[None, None, :, None]).astype(np.uint8)


def _write_torchvision_cifar(raw: Path, dataset_cls, n_classes: int, per_class: int, monkeypatch) -> dict:
    """Write torchvision's on-disk CIFAR format (pickled batches of CHW-flattened rows plus the meta
    file) and point the dataset class's md5 list at these files, so its own integrity check passes."""
    rng = np.random.default_rng(0)
    folder = raw / dataset_cls.base_folder
    folder.mkdir(parents=True)
    key = "labels" if dataset_cls is torchvision.datasets.CIFAR10 else "fine_labels"
    written = {}

    def write(name, labels):
        images = _smooth_images(len(labels), rng)
        rows = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        (folder / name).write_bytes(pickle.dumps({"data": rows, key: list(map(int, labels))}))
        written[name] = (images, np.asarray(labels))
        return [name, hashlib.md5((folder / name).read_bytes()).hexdigest()]

    def shuffled_labels():
        return rng.permutation(np.repeat(np.arange(n_classes), per_class))

    train_names = [n for n, _ in dataset_cls.train_list]
    monkeypatch.setattr(dataset_cls, "train_list", [write(n, shuffled_labels()) for n in train_names])
    test_names = [n for n, _ in dataset_cls.test_list]
    monkeypatch.setattr(dataset_cls, "test_list", [write(n, shuffled_labels()) for n in test_names])
    names = [f"class_{i:03d}" for i in range(n_classes)]
    meta = folder / dataset_cls.meta["filename"]
    meta.write_bytes(pickle.dumps({dataset_cls.meta["key"]: names}))
    md5 = hashlib.md5(meta.read_bytes()).hexdigest()
    monkeypatch.setattr(dataset_cls, "meta", {**dataset_cls.meta, "md5": md5})
    train = [written[n] for n in train_names]
    test = written[test_names[0]]
    return {
        "classes": names,
        "train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        "test": test,
    }


@pytest.mark.parametrize("name,n_classes", [("cifar10", 10), ("cifar100", 100)])
def test_torchvision_cifar_written_as_jpeg_class_folders(tmp_path, monkeypatch, name, n_classes):
    dataset_cls = getattr(torchvision.datasets, D.TORCHVISION_SETS[name])
    monkeypatch.setattr(
        torchvision.datasets.cifar, "download_and_extract_archive", lambda *a, **k: pytest.fail("downloaded")
    )
    truth = _write_torchvision_cifar(tmp_path / "cache/torchvision", dataset_cls, n_classes, 2, monkeypatch)
    root = resolve_data(name, cache_dir=tmp_path / "cache")
    assert root == tmp_path / "cache" / f"{name}-jpeg" and (root / ".complete").is_file()
    for split in ("train", "test"):
        index = scan_image_folder(root, split=split)
        assert index.classes == truth["classes"] and index.counts["jpeg"] == len(index)
        images, labels = truth[split]
        assert len(index) == len(labels)
        x, y = load_uint8(index, cache_dir=tmp_path / "cache")
        # file c/NNNN.jpg is the NNNN-th image of class c in torchvision's order
        for c in range(n_classes):
            ours, theirs = x[y == c].astype(int), images[labels == c].astype(int)
            assert np.abs(ours - theirs).mean() < 1.5 and np.abs(ours - theirs).max() < 24
    assert (root / "train" / truth["classes"][0] / "0000.jpg").is_file()

    monkeypatch.setattr(D, "write_class_folders", lambda *a: pytest.fail("converted twice"))
    assert resolve_data(name.upper(), cache_dir=tmp_path / "cache") == root


def test_torchvision_without_internet_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as err:
        resolve_data("cifar10", cache_dir=tmp_path)
    assert str(tmp_path / "torchvision") in str(err.value) and "no route to host" in str(err.value)
    assert not (tmp_path / "cifar10-jpeg").exists()


def test_archive_made_by_the_zstd_tool(tmp_path):
    """Also with more bytes after tar's end marker than a pipe holds (tarfile stops reading at the marker;
    zstd must still get to write the rest, or it dies of SIGPIPE)."""
    if not shutil.which("zstd"):
        pytest.skip("no zstd binary here")
    tree(tmp_path / "src")
    raw = _archive(tmp_path / "src", tmp_path / "a.tar", ".")
    with raw.open("ab") as fh:
        fh.write(bytes(1 << 20))  # zero blocks: still a valid tar
    subprocess.run(["zstd", "-q", str(raw), "-o", str(tmp_path / "a.tar.zst")], check=True)
    root = resolve_data(tmp_path / "a.tar.zst", cache_dir=tmp_path / "cache")
    assert scan_image_folder(root).classes == ["cat", "dog"]
