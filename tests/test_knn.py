"""kNN monitor: agreement with a brute-force reference, chunking, model modes, and real CIFAR-10 JPEGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fastse.pipelines.loader import build_loader
from torch import nn

from fastse.eval import extract_features, knn_accuracy, knn_eval, knn_predict
from fastse.models import resnet_backbone


def _reference(train, labels, test, k, t, c):
    """Per test sample, in float64: the k most similar train samples vote exp(cos / t) for their class."""
    train = nn.functional.normalize(train.double(), dim=1)
    test = nn.functional.normalize(test.double(), dim=1)
    out = torch.zeros(len(test), c, dtype=torch.float64)
    for i, q in enumerate(test):
        sims = (train @ q).tolist()
        for j in sorted(range(len(sims)), key=lambda j: -sims[j])[:k]:
            out[i, labels[j]] += np.exp(sims[j] / t)
    return out


@pytest.mark.parametrize("k", [1, 20, 500])
def test_matches_brute_force(k):
    g = torch.Generator().manual_seed(k)
    train, test = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    scores = knn_predict(train * 3.0, labels, test, k=k, temperature=0.07, num_classes=7)  # any norm: cosine
    ref = _reference(train, labels, test, min(k, 300), 0.07, 7)
    assert scores.shape == (40, 7) and scores.dtype == torch.float32
    assert torch.allclose(scores.double(), ref, rtol=1e-4, atol=1e-6)


def test_chunking_does_not_change_scores():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 32, generator=g), torch.randn(97, 32, generator=g)
    labels = torch.randint(0, 10, (500,), generator=g)
    full = knn_predict(train, labels, test, num_classes=10, chunk=1024)
    for chunk in (1, 13, 97):
        part = knn_predict(train, labels, test, num_classes=10, chunk=chunk)
        assert torch.allclose(part, full, rtol=1e-5) and torch.equal(part.argmax(1), full.argmax(1))


def test_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=g)
    ytrain, ytest = torch.arange(600) % 6, torch.arange(120) % 6
    train = centres[ytrain] + 0.1 * torch.randn(600, 32, generator=g)
    test = centres[ytest] + 0.1 * torch.randn(120, 32, generator=g)
    acc = knn_accuracy(train, ytrain, test, ytest, k=200, temperature=0.1)
    assert acc == {"top1": 100.0, "top5": 100.0}
    shuffled = knn_accuracy(train, ytrain[torch.randperm(600, generator=g)], test, ytest, k=20)
    assert shuffled["top1"] < 40 and shuffled["top5"] > shuffled["top1"]


def test_extract_features_restores_modes_and_normalises():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()
    model[2].eval()  # a frozen BatchNorm inside a training model stays frozen
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    x, y = torch.randn(10, 3, 2, 2), torch.arange(10)
    batches = [((x[:6], x[:6] + 1), y[:6]), ((x[6:], x[6:] + 1), y[6:])]  # (views, labels), as build_loader yields
    feats, labels = extract_features(model, batches, device="cpu")
    assert seen == [False, False]
    assert [m.training for m in model] == [True, True, False, True]
    assert feats.shape == (10, 8) and feats.dtype == torch.float32 and torch.equal(labels, y)
    assert torch.allclose(feats.norm(dim=1), torch.ones(10))
    assert torch.allclose(feats, nn.functional.normalize(model.eval()(x), dim=1), atol=1e-6)
    model.train()
    feats2, _ = extract_features(model, [(x[:6], y[:6]), (x[6:], y[6:])], device="cpu", num_samples=7)  # plain (x, y)
    assert torch.allclose(feats2, feats[:7])

    def broken():
        yield x, y
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        extract_features(model, broken(), device="cpu")
    assert [m.training for m in model] == [True, True, True, True]


@pytest.fixture(scope="module")
def cifar_subset(cifar10_dir, tmp_path_factory):
    """A small class-folder copy (symlinks) of the real CIFAR-10 JPEGs: 60 train and 30 test images a class."""
    root = tmp_path_factory.mktemp("cifar-knn")
    for split, count in (("train", 60), ("test", 30)):
        for class_dir in sorted((cifar10_dir / split).iterdir()):
            dest = root / split / class_dir.name
            dest.mkdir(parents=True)
            for f in sorted(class_dir.glob("*.jpg"))[:count]:
                (dest / f.name).symlink_to(f)
    return root


def test_knn_on_cifar_jpegs(cifar_subset, tmp_path):
    def loader(split):  # 600 / 300 images in batches of 128: the last batch wraps around
        return build_loader("eval", cifar_subset, split=split, batch_size=128, device="cpu", backend="tensor",
                            drop_last=False, cache_dir=tmp_path)

    train, test = loader("train"), loader("test")
    feats, labels = extract_features(nn.Flatten(), train, device="cpu", num_samples=600)
    assert feats.shape == (600, 3 * 32 * 32)
    assert torch.equal(labels.bincount(), torch.full((10,), 60))  # the padding is cut off: each image once
    pixels = knn_eval(nn.Flatten(), train, test, device="cpu", num_train=600, num_test=300)
    assert pixels["top1"] > 15 and pixels["top5"] > pixels["top1"]  # chance: 10 / 50

    torch.manual_seed(0)
    net = resnet_backbone("resnet18", cifar_stem=True)
    acc = knn_eval(net, train, test, device="cpu", k=50, num_train=600, num_test=300)
    assert net.training and 15 < acc["top1"] <= acc["top5"] <= 100  # random conv features beat chance too


def test_knn_inside_bf16_autocast_matches_float32():
    """The trainer calls the monitor under bf16 autocast: similarities must stay float32."""
    from fastse.eval.knn import knn_predict

    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    ref = knn_predict(train, labels, test, k=20, num_classes=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = knn_predict(train, labels, test, k=20, num_classes=5)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
