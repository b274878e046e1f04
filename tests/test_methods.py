"""BYOL and MoCo v2 modules: losses, what trains, what the smoother pairs, the MoCo queue (also on 2 gloo ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastse.methods.byol import BYOL, byol_loss
from fastse.methods.moco import MoCoV2
from fastse.models import resnet_backbone
from fastse.smoothing import Smoother


def _byol() -> BYOL:
    torch.manual_seed(0)
    return BYOL(resnet_backbone("resnet18", cifar_stem=True), proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64)


def _moco(queue_size: int = 16) -> MoCoV2:
    torch.manual_seed(0)
    return MoCoV2(resnet_backbone("resnet18", cifar_stem=True), hidden_dim=64, dim=32, queue_size=queue_size)


def _views(n: int = 4, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def test_byol_loss_is_two_minus_two_cosine():
    z = torch.randn(5, 8)
    assert byol_loss(3 * z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-z, z).item() == pytest.approx(4.0, abs=1e-6)
    p = torch.randn(5, 8)
    expected = (2 - 2 * (F.normalize(p, dim=1) * F.normalize(z, dim=1)).sum(1)).mean()
    assert byol_loss(p, z).item() == pytest.approx(expected.item(), rel=1e-6)


def test_byol_trains_the_student_only_and_pairs_backbone_and_projector():
    method = _byol().train()
    loss = method(_views())
    assert loss.ndim == 0 and 0.0 <= loss.item() <= 8.0
    loss.backward()
    assert all(p.grad is not None for p in method.student.parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters())
    student, teacher = method.smoothing_pairs()
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in teacher.named_parameters()]
    assert not any(n.startswith("predictor") for n, _ in teacher.named_parameters())  # student-only predictor
    assert method.backbone is method.teacher.backbone
    Smoother(student, teacher, rule="sts")  # the pair is valid for the smoother


def test_wrap_routes_the_forward_through_wrappers():
    method, calls = _byol().train(), []
    method.wrap(student=lambda *v: calls.append("s") or method.student(*v),
                teacher=lambda x: calls.append("t") or method.teacher(x))
    method(_views())
    assert calls == ["s", "t", "t"]
    assert not any(k.startswith("_") for k in method.state_dict())  # wrappers are not in the state


def test_moco_loss_and_queue_update():
    method = _moco(queue_size=10).train()
    before = method.queue.clone()
    xq, xk = _views(n=4)
    loss = method((xq, xk))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert method.queue_ptr.item() == 4
    with torch.no_grad():
        keys = F.normalize(method.teacher(xk), dim=1)  # same BN batch as in the forward: the same keys
    torch.testing.assert_close(method.queue[:4], keys)
    assert torch.equal(method.queue[4:], before[4:])
    assert set(method.state_tensors()) == {"queue", "queue_ptr"}
    assert method.smoothing_pairs() == (method.student, method.teacher)


def test_moco_queue_wraps_around():
    method = _moco(queue_size=10)
    for i in range(3):
        method.enqueue(torch.full((4, 32), float(i)))
    assert method.queue_ptr.item() == 2  # 12 keys into 10 rows
    assert method.queue[:2, 0].tolist() == [2.0, 2.0] and method.queue[2:4, 0].tolist() == [0.0, 0.0]
    assert method.queue[4:8, 0].tolist() == [1.0] * 4 and method.queue[8:, 0].tolist() == [2.0, 2.0]


def test_moco_infonce_matches_a_direct_computation():
    method = _moco(queue_size=6).train()
    method.temperature = 0.2
    queue = method.queue.clone()
    xq, xk = _views(n=3)
    loss = method((xq, xk))
    with torch.no_grad():
        q = F.normalize(method.student(xq), dim=1)
        k = method.queue[:3]
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / 0.2
    assert loss.item() == pytest.approx(F.cross_entropy(logits, torch.zeros(3, dtype=torch.long)).item(), rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moco_rank(rank: int, world: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fastse.distributed import all_gather_cat

        method = _moco(queue_size=16).eval()  # per-sample BN (same statistics on both ranks): keys
        xq, xk = _views(n=4, seed=10 + rank)   # encoded on the other rank must come back in order
        own, every = method.keys(xk)
        plain = F.normalize(method.teacher(xk), dim=1)
        loss = method.train()((xq, xk))
        loss.backward()
        torch.save({"loss": loss.detach(), "queue": method.queue, "ptr": method.queue_ptr, "own": own,
                    "plain": plain, "every": every, "gathered": all_gather_cat(plain)}, f"{result_dir}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_moco_shuffle_bn_and_queue_on_two_gloo_processes(tmp_path):
    mp.spawn(_moco_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.isfinite(r0["loss"]) and torch.isfinite(r1["loss"])
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"].item() == r1["ptr"].item() == 8  # 2 ranks x 4 keys
    assert not torch.equal(r0["queue"][:4], r0["queue"][4:8])  # rank 0's keys, then rank 1's
    for r in (r0, r1):
        torch.testing.assert_close(r["own"], r["plain"])  # unshuffled back to this rank's samples
        torch.testing.assert_close(r["every"], r["gathered"])  # and every rank's, in rank order
