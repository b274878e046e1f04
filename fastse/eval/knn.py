"""Weighted k-nearest-neighbour classification of features: the kNN monitor of InstDisc (Wu et al.
2018) and MoCo. Each test sample's k most cosine-similar training samples vote for their class with
weight exp(similarity / temperature); the class with the largest sum wins.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[Tensor | tuple[Tensor, ...], Tensor]],
    *,
    device: str | torch.device,
    num_samples: int | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """(features float32 [N, D], L2-normalised unless `normalize` is False; labels int64 [N]), both on `device`.

    `batches` yields (x, labels) with x [B, ...] or a tuple of views (a `build_loader` loader: the
    first view is used). The model runs in eval mode; every submodule's train/eval mode is restored
    afterwards. Wrap the call in `torch.autocast` for reduced-precision forwards. `num_samples` keeps
    the first N rows: a single-rank loader with drop_last=False pads its last batch by wrapping
    around to the epoch's first samples, which this cuts off again.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            x = x[0] if isinstance(x, (tuple, list)) else x
            f = model(x.to(device, non_blocking=True)).float().flatten(1)
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(torch.as_tensor(y).to(device, torch.int64, non_blocking=True))
    finally:
        for m, training in modes:
            m.training = training
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats)[:num_samples], torch.cat(labels)[:num_samples]


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int,
    chunk: int = 1024,
) -> Tensor:
    """Class scores [M, num_classes] of test features [M, D] from train features [N, D] with int
    labels [N]: the sum of exp(cos / temperature) over each test sample's k most similar train
    samples (k capped at N), by class. Computed `chunk` test rows at a time (a [chunk, N] similarity
    block) on the features' device, in float32."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"knn_predict: features must be [N, D] and [M, D]; got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if train_labels.shape != train_feats.shape[:1]:
        raise ValueError(f"knn_predict: {len(train_feats)} train features, labels of shape {tuple(train_labels.shape)}")
    bank = F.normalize(train_feats.float(), dim=1).t()  # [D, N]
    labels = train_labels.to(bank.device, torch.int64)
    k = min(k, bank.shape[1])
    scores = []
    for q in test_feats.split(chunk):
        with torch.autocast(bank.device.type, enabled=False):  # float32 similarities even inside autocast
            sim, idx = (F.normalize(q.float(), dim=1) @ bank).topk(k, dim=1)  # [c, k]
        votes = torch.zeros(len(q), num_classes, device=bank.device)
        scores.append(votes.scatter_add_(1, labels[idx], (sim / temperature).exp_()))
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=bank.device)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """{"top1", "top5"}: kNN accuracies in percent (see knn_predict); `num_classes` defaults to the
    largest label + 1. With fewer than 5 classes top5 is 100."""
    if len(test_feats) == 0:
        raise ValueError("knn_accuracy: no test samples")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, k=k, temperature=temperature,
                         num_classes=num_classes, chunk=chunk)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels.to(top.device, torch.int64)[:, None]
    return {"top1": 100.0 * hit[:, 0].sum().item() / len(hit), "top5": 100.0 * hit.any(1).sum().item() / len(hit)}


def knn_eval(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    device: str | torch.device,
    k: int = 200,
    temperature: float = 0.1,
    num_train: int | None = None,
    num_test: int | None = None,
) -> dict[str, float]:
    """kNN top-1/top-5 (%) of `model`'s features: the train split is the memory bank, the test split
    is classified. Loaders as for `extract_features`, e.g. `build_loader("eval", ..., split=...,
    drop_last=False)`; `num_train` / `num_test` (the split sizes) cut off the wrap-around padding of
    such a loader's last batch, so each image counts once."""
    train = extract_features(model, train_loader, device=device, num_samples=num_train)
    test = extract_features(model, test_loader, device=device, num_samples=num_test)
    return knn_accuracy(*train, *test, k=k, temperature=temperature)
