"""Linear evaluation and backbone loading: protocols and schedules, the head on separable features,
the byol and fast protocols end to end on a tiny pretraining run over real CIFAR-10 JPEGs, and every
kind of checkpoint (run folder, backbone.safetensors, torchvision state dicts) with its error messages."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from safetensors.torch import save_file

from fastse.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint
from fastse.eval.linear import (
    accuracy,
    eval_data,
    get_protocol,
    linear_eval,
    make_head,
    train_head,
    train_head_on_features,
    train_linear,
)
from fastse.eval.load import load_backbone_for_eval

# ------------------------------------------------------------------------------------ protocols


def test_protocols_follow_the_papers():
    byol, moco, fast = get_protocol("byol"), get_protocol("moco"), get_protocol("fast")
    assert (byol.epochs, byol.lr, byol.weight_decay, byol.schedule, byol.batchnorm) == (80, 0.2, 0.0, "cosine", True)
    assert get_protocol("byol", small=True).epochs == 100
    assert (moco.epochs, moco.lr, moco.weight_decay, moco.schedule, moco.batchnorm) == (100, 30.0, 0.0, "step", False)
    assert fast.precomputed and not byol.precomputed
    assert get_protocol("byol", batch_size=512).scaled_lr == pytest.approx(0.4)
    assert get_protocol("fast", epochs=3, copies=2, lr=None).epochs == 3


def test_schedules():
    moco = get_protocol("moco", batch_size=256)
    assert [moco.lr_of(s, 100) for s in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    byol = get_protocol("byol", batch_size=256)
    assert byol.lr_of(0, 100) == pytest.approx(0.2) and byol.lr_of(50, 100) == pytest.approx(0.1)


@pytest.mark.parametrize("name,changes,message", [
    ("simclr", {}, "unknown protocol"), ("byol", {"epochs": 0}, "epochs=0"), ("byol", {"lr": -1.0}, "lr=-1.0"),
    ("byol", {"copies": 2}, "fast protocol"),
])
def test_bad_protocols(name, changes, message):
    with pytest.raises(ValueError, match=message):
        get_protocol(name, **changes)


@pytest.mark.parametrize("batchnorm", [True, False])
def test_head_learns_separable_features(batchnorm):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(400) % 4
    feats = centres[labels] + torch.randn(400, 16, generator=g) * 0.3 + 5.0  # offset: BN's job
    head = make_head(16, 4, batchnorm=batchnorm)
    protocol = get_protocol("fast", epochs=20, batch_size=50, lr=0.5 if batchnorm else 0.05)
    losses = []
    batches = lambda e: ((feats[i:i + 50], labels[i:i + 50]) for i in range(0, 400, 50))
    train_head(head, batches, 8, protocol, on_epoch=lambda e, loss: losses.append(loss))
    assert len(losses) == 20 and losses[-1] < losses[0]
    acc = accuracy(head, feats, labels, chunk=64)
    assert acc == {"top1": 100.0, "top5": 100.0}


@pytest.mark.parametrize("batchnorm,weight_decay", [(True, 0.0), (False, 1e-3)])
def test_hand_written_fast_loop_matches_autograd_and_torch_sgd(batchnorm, weight_decay):
    """The fast protocol's graph-friendly loop is the same SGD as `train_head` (autograd + torch.optim)."""
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(230, 12, generator=g) * 2 + 1, torch.randint(0, 5, (230,), generator=g)
    protocol = get_protocol("fast", epochs=3, batch_size=32, lr=0.3, weight_decay=weight_decay,
                            batchnorm=batchnorm)
    torch.manual_seed(0)
    ours, reference = make_head(12, 5, batchnorm=batchnorm), make_head(12, 5, batchnorm=batchnorm)
    reference.load_state_dict(ours.state_dict())
    order = torch.Generator().manual_seed(7)

    def batches(epoch):
        perm = torch.randperm(230, generator=order)
        return ((feats[perm[i * 32:(i + 1) * 32]], labels[perm[i * 32:(i + 1) * 32]]) for i in range(230 // 32))

    ours_losses, reference_losses = [], []
    train_head_on_features(ours, feats, labels, protocol, seed=7, on_epoch=lambda e, v: ours_losses.append(v))
    train_head(reference, batches, 230 // 32, protocol, on_epoch=lambda e, v: reference_losses.append(v))
    assert ours_losses == pytest.approx(reference_losses, rel=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name,changes", [("byol", {"epochs": 1, "batch_size": 25}),
                                          ("moco", {"epochs": 1, "batch_size": 25}),
                                          ("fast", {"epochs": 5, "batch_size": 50, "copies": 1})])
def test_linear_eval_on_a_tiny_run(tiny_run, tiny_cifar, name, changes):
    backbone = load_backbone_for_eval(tiny_run)
    data = eval_data(tiny_cifar, dataset="cifar10", cache_dir=str(tiny_run.parent / "cache"))
    assert data.small and data.size == 32 and data.num("train") == 100 and data.num("test") == 40
    epochs = []
    protocol = get_protocol(name, small=data.small, **changes)
    result = linear_eval(backbone, data, protocol, device="cpu", on_epoch=lambda e, loss: epochs.append(loss))
    assert len(epochs) == changes["epochs"] and all(map(torch.isfinite, torch.tensor(epochs)))
    assert 0.0 <= result["top1"] <= result["top5"] <= 100.0 and result["top5"] > 0
    assert result["protocol"] == name and result["feature_dim"] == 512 and result["test_images"] == 40
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def _ddp_rank(rank: int, world: int, port: int, run: Path, data: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        losses = []
        head = train_linear(load_backbone_for_eval(run), eval_data(data, dataset="cifar10", limit=40),
                            get_protocol("byol", epochs=2, batch_size=20), on_epoch=lambda e, loss: losses.append(loss))
        torch.save({"head": head.state_dict(), "losses": losses}, run.parent / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp_trains_one_head(tiny_run, tiny_cifar):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, tiny_run, tiny_cifar), nprocs=2)
    r0, r1 = (torch.load(tiny_run.parent / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(r0["head"][k], r1["head"][k]) for k in r0["head"]) and r0["losses"] == r1["losses"]
    assert r0["head"]["0.num_batches_tracked"] == 4  # 2 epochs of 2 steps: 20 images a step, 10 a rank


def test_fast_protocol_and_ragged_batches_are_refused_under_ddp(tiny_run, tiny_cifar, monkeypatch):
    from fastse import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    backbone, data = load_backbone_for_eval(tiny_run), eval_data(tiny_cifar, dataset="cifar10")
    with pytest.raises(ValueError, match="fast protocol runs on one process"):
        train_linear(backbone, data, get_protocol("fast"))
    with pytest.raises(ValueError, match="batch_size=25 is not divisible by the 2 processes"):
        train_linear(backbone, data, get_protocol("byol", batch_size=25))


def test_limit_keeps_fixed_subsets(tiny_cifar, tmp_path):
    a = eval_data(tiny_cifar, dataset="cifar10", limit=30, cache_dir=str(tmp_path))
    b = eval_data(tiny_cifar, dataset="cifar10", limit=30, cache_dir=str(tmp_path))
    assert a.num("train") == a.num("test") == 30 and (a.train_idx == b.train_idx).all()


def test_data_without_a_test_split_is_refused(tiny_cifar, tmp_path):
    shutil.copytree(tiny_cifar / "train", tmp_path / "only" / "train")
    with pytest.raises(ValueError, match="train/ and test/"):
        eval_data(tmp_path / "only")


# ------------------------------------------------------------------------------------ checkpoints


def _same(net, state, prefix=""):
    own = net.state_dict()
    return all(torch.equal(own[k], state[prefix + k]) for k in own)


def test_run_folder_gives_teacher_or_student(tiny_run):
    groups, _ = load_checkpoint(latest_checkpoint(tiny_run))
    teacher = load_backbone_for_eval(tiny_run)
    student = load_backbone_for_eval(tiny_run, which="student")
    assert _same(teacher, groups["teacher"], "backbone.") and _same(student, groups["student"], "encoder.backbone.")
    assert not _same(teacher, groups["student"], "encoder.backbone.")  # 4 steps apart
    export = load_backbone_for_eval(tiny_run / "backbone.safetensors")
    assert _same(export, teacher.state_dict())
    assert isinstance(teacher.conv1, torch.nn.Conv2d) and teacher.conv1.kernel_size == (3, 3)


def test_run_folder_errors(tiny_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not match the run's architecture resnet18"):
        load_backbone_for_eval(tiny_run, arch="resnet50")
    with pytest.raises(CheckpointError, match="--which student needs a run folder"):
        load_backbone_for_eval(tiny_run / "backbone.safetensors", which="student")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_backbone_for_eval(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_for_eval(tmp_path / "nothing.pth")


@pytest.mark.parametrize("suffix,prefix", [(".pth", "module."), (".safetensors", ""), (".pt", "backbone.")])
def test_torchvision_state_dicts(tmp_path, suffix, prefix):
    net = torchvision.models.resnet18(weights=None)
    state = {prefix + k: v for k, v in net.state_dict().items()}  # with fc.*: ignored
    file = tmp_path / f"r18{suffix}"
    save_file(state, file) if suffix == ".safetensors" else torch.save({"state_dict": state}, file)
    loaded = load_backbone_for_eval(file, arch="resnet18")
    assert loaded.conv1.kernel_size == (7, 7) and not loaded.training
    assert _same(loaded, {k: v for k, v in net.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    net.fc = torch.nn.Identity()
    assert torch.allclose(loaded(x), net.eval()(x))


def test_state_dict_errors_are_one_clear_line(tmp_path):
    file = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), file)
    with pytest.raises(CheckpointError, match="give --arch"):
        load_backbone_for_eval(file)
    with pytest.raises(CheckpointError, match=r"not a resnet50 state dict: .*'layer1.0.conv1.weight' has shape "
                                              r"\(64, 64, 3, 3\), resnet50 expects \(64, 64, 1, 1\)"):
        load_backbone_for_eval(file, arch="resnet50")
    with pytest.raises(CheckpointError, match="not a resnet34 state dict: missing key 'layer1.2"):
        load_backbone_for_eval(file, arch="resnet34")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        load_backbone_for_eval(tmp_path / "junk.pth", arch="resnet18")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_backbone_for_eval(tmp_path / "junk.safetensors", arch="resnet18")
    extra = {**torchvision.models.resnet18().state_dict(), "projector.0.weight": torch.zeros(4, 512)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="not a resnet18 state dict: unexpected key 'projector.0.weight'"):
        load_backbone_for_eval(tmp_path / "extra.pth", arch="resnet18")
    torch.save({"step": 3}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_backbone_for_eval(tmp_path / "meta.pth", arch="resnet18")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture)")
def test_fast_loop_as_a_cuda_graph_equals_the_eager_loop(monkeypatch):
    import fastse.eval.linear as linear

    g = torch.Generator().manual_seed(2)
    feats, labels = (torch.randn(3000, 64, generator=g) + 1).cuda(), torch.randint(0, 10, (3000,), generator=g).cuda()
    protocol = get_protocol("fast", epochs=4, batch_size=256)
    heads = []
    for warmup in (linear._GRAPH_WARMUP, 10**9):  # captured after 3 steps / never captured
        monkeypatch.setattr(linear, "_GRAPH_WARMUP", warmup)
        torch.manual_seed(0)
        heads.append(make_head(64, 10, batchnorm=True).cuda())
        train_head_on_features(heads[-1], feats, labels, protocol, seed=3)
    for a, b in zip(heads[0].state_dict().values(), heads[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
