"""Accuracy reference for BYOL on CIFAR-10: the plain data path of lightly's benchmark (torchvision
`ImageFolder` + PIL transforms in worker processes) and fp32 eager training around fastse's own BYOL
module, teacher rule (`Smoother`, torch kernel) and kNN, to compare with `fastse pretrain`'s GPU
augmentation, bf16 and compiled step at the same settings.

    python benchmarks/reference_byol.py --data <CIFAR-10 JPEG tree> --epochs 20 --knn-every 5
    python -c "from fastse.pretrain.config import preset; from fastse.pretrain.trainer import train; train(preset( \
      'byol-cifar10', data='<tree>', epochs=20, knn_every=5, knn_student=True, smoothing='ema', momentum=0.996, \
      proj_hidden_dim=1024, pred_hidden_dim=1024, wandb='disabled'))"

Defaults are lightly's teacher and heads (EMA from 0.996, 1024-wide) with the preset's SGD (lr 0.03 per
256 images, cosine, no warmup; wd 2e-3; our loss has 4x lightly's gradient, so these are their lr 0.24
and wd 5e-4 at batch 512). Prints one JSON line per epoch (loss, wall seconds; kNN top-1 of teacher and
student every --knn-every epochs, k = 200, T = 0.1) and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib.util import find_spec

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

if find_spec("fastse") is None or find_spec("fastse.pipelines") is None:  # the checkout's fastse/ alone: no pipelines/
    sys.exit("fastse is not installed: pip install -e . first (in the checkout; make setup does it)")
from fastse.pipelines.recipes import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

from fastse.eval.knn import knn_eval  # noqa: E402
from fastse.methods.byol import BYOL  # noqa: E402
from fastse.models.resnet import resnet_backbone  # noqa: E402
from fastse.smoothing import Smoother, cosine_momentum  # noqa: E402


def byol_view(solarize_p: float, normalize: T.Normalize) -> T.Compose:
    """lightly's BYOLView1/2Transform at 32 px without blur: crop, flip, jitter, grayscale, solarize."""
    return T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      T.RandomSolarize(128, p=solarize_p), T.ToTensor(), normalize])


class TwoViews:
    def __init__(self, normalize: T.Normalize):
        self.first, self.second = byol_view(0.0, normalize), byol_view(0.2, normalize)

    def __call__(self, image):
        return self.first(image), self.second(image)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="class-folder tree with train/ and test/")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--knn-every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=0.03, help="per 256 images")
    ap.add_argument("--weight-decay", type=float, default=2e-3)
    ap.add_argument("--momentum", type=float, default=0.996, help="teacher EMA, cosine to 1")
    ap.add_argument("--hidden-dim", type=int, default=1024, help="projector and predictor width")
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    normalize, dev, started = T.Normalize(CIFAR10_MEAN, CIFAR10_STD), torch.device(args.device), time.time()
    plain = T.Compose([T.ToTensor(), normalize])
    kw = dict(num_workers=args.workers, pin_memory=dev.type == "cuda", persistent_workers=args.workers > 0)
    train = DataLoader(ImageFolder(f"{args.data}/train", transform=TwoViews(normalize)), batch_size=args.batch_size,
                       shuffle=True, drop_last=True, **kw)
    bank = DataLoader(ImageFolder(f"{args.data}/train", transform=plain), batch_size=1024, **kw)
    test = DataLoader(ImageFolder(f"{args.data}/test", transform=plain), batch_size=1024, **kw)
    model = BYOL(resnet_backbone("resnet18", cifar_stem=True), proj_hidden_dim=args.hidden_dim,
                 pred_hidden_dim=args.hidden_dim).to(dev)
    smoother = Smoother(model.student.encoder, model.teacher, rule="ema", momentum=args.momentum, kernel="torch")
    peak = args.lr * args.batch_size / 256
    optimizer = torch.optim.SGD(model.student.parameters(), lr=peak, momentum=0.9, weight_decay=args.weight_decay)
    total, step, rows = args.epochs * len(train), 0, []
    for epoch in range(1, args.epochs + 1):
        losses = []
        for (x1, x2), _ in train:
            for group in optimizer.param_groups:
                group["lr"] = peak * (1 + math.cos(math.pi * step / total)) / 2
            loss = model((x1.to(dev, non_blocking=True), x2.to(dev, non_blocking=True)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            smoother.step(momentum=cosine_momentum(step, total, base=args.momentum))
            losses.append(loss.detach())
            step += 1
        line = {"epoch": epoch, "loss": round(torch.stack(losses).mean().item(), 4),
                "wall_s": round(time.time() - started, 1)}
        if epoch % args.knn_every == 0 or epoch == args.epochs:
            with torch.no_grad():
                line["knn_top1"] = knn_eval(model.backbone, bank, test, device=dev)["top1"]
                line["knn_student_top1"] = knn_eval(model.student_backbone, bank, test, device=dev)["top1"]
            rows.append(line)
        print(json.dumps(line), flush=True)
    print(f"\n{'epoch':>5} {'loss':>7} {'teacher kNN %':>13} {'student kNN %':>13} {'wall s':>7}")
    for r in rows:
        print(f"{r['epoch']:>5} {r['loss']:>7.4f} {r['knn_top1']:>13.2f} {r['knn_student_top1']:>13.2f} "
              f"{r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
