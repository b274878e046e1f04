"""Checkpoints: round trips, exact optimizer/RNG resume, pruning, torn and killed writes, backbone export."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from fastse.checkpoints import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastse.models import resnet_backbone
from fastse.models.export import export_backbone, load_backbone


def _groups(step: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return {"student": {"w": torch.randn(4, 3, generator=g), "n": torch.tensor(step)},
            "queue": {"keys": torch.randn(8, 2, generator=g).to(torch.bfloat16)}}


def _save(run, step, keep=3):
    return save_checkpoint(run, step, _groups(step), {"epoch": step // 2, "config": {"lr": 0.1}}, keep=keep)


def test_round_trip(tmp_path):
    w = torch.randn(6, 4)
    groups = {"student": {"w": w, "tied": w, "view": w[1:3].t(), "scalar": torch.tensor(2.5)},
              "queue": {"k": torch.randn(3, 2, dtype=torch.bfloat16), "ptr": torch.tensor(7)}}
    path = save_checkpoint(tmp_path, 12, groups, {"epoch": 3, "config": {"method": "byol"}, "path": tmp_path})
    assert path == tmp_path / "checkpoints" / "step-000000012"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "queue.safetensors", "student.safetensors"]
    assert latest_checkpoint(tmp_path) == path
    loaded, meta = load_checkpoint(path)
    for name, tensors in groups.items():
        assert loaded[name].keys() == tensors.keys()
        for key, t in tensors.items():
            assert loaded[name][key].dtype == t.dtype and torch.equal(loaded[name][key], t)
    assert meta["step"] == 12 and meta["epoch"] == 3 and meta["config"] == {"method": "byol"}
    assert meta["path"] == str(tmp_path) and set(meta["files"]) == {"student.safetensors", "queue.safetensors"}
    assert {"fastse_version", "time", "format"} <= meta.keys()
    # re-saving a step replaces it
    save_checkpoint(tmp_path, 12, {"student": {"w": w + 1}}, {})
    assert torch.equal(load_checkpoint(path)[0]["student"]["w"], w + 1)


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint(tmp_path / "nope")
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"step": 1}))
    with pytest.raises(CheckpointError, match="not a fastse-checkpoint/1 checkpoint"):
        load_checkpoint(other)
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(pt)
    with pytest.raises(TypeError, match="'lr' is a float"):
        save_checkpoint(tmp_path, 0, {"opt": {"lr": 0.1}}, {})
    with pytest.raises(ValueError, match="group name"):
        save_checkpoint(tmp_path, 0, {"a/b": {}}, {})
    assert not (tmp_path / "checkpoints" / "step-000000000").exists()


def test_keep_prunes_oldest(tmp_path):
    for step in (10, 20, 30, 40, 50):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000040", "step-000000050"]
    _save(tmp_path, 5, keep=2)  # an older step (resumed elsewhere) is written and kept, never the one just saved
    assert (tmp_path / "checkpoints" / "step-000000005").is_dir()
    assert latest_checkpoint(tmp_path).name == "step-000000050"


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta", "bad_meta", "missing_file", "temp_folder"])
def test_torn_checkpoint_skipped(tmp_path, damage, caplog):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    file = bad / "student.safetensors"
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(file.read_bytes())
        data[-1] ^= 1
        file.write_bytes(bytes(data))
    elif damage == "no_meta":
        (bad / "meta.json").unlink()
    elif damage == "bad_meta":
        (bad / "meta.json").write_text('{"format": "fastse-checkpoint/1", "files": {')
    elif damage == "missing_file":
        file.unlink()
    else:  # a complete-looking temp folder of a newer step, left by a crash before the rename
        bad.rename(tmp_path / "checkpoints" / ".tmp-step-000000003-123-abcd")
    assert latest_checkpoint(tmp_path) == good
    if damage != "temp_folder":
        assert "skipping checkpoint" in caplog.text and str(bad) in caplog.text
        with pytest.raises(CheckpointError, match="student.safetensors|meta.json"):
            load_checkpoint(bad)
    _save(tmp_path, 4)  # the next save clears temp folders
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


_WRITER = """
import sys, torch
from fastse.checkpoints import save_checkpoint
run, step = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
while True:
    v = float(step)
    save_checkpoint(run, step, {"a": {"w": torch.full((1_500_000,), v)}, "b": {"w": torch.full((500_000,), -v)}},
                    {"value": v}, keep=2)
    step += 1
"""


def test_kill_during_writes_never_leaves_a_bad_latest(tmp_path):
    rng = random.Random(0)
    step, interrupted = 0, 0
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(step)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        interrupted += any(p.name.startswith(".") for p in (tmp_path / "checkpoints").glob("*"))
        latest = latest_checkpoint(tmp_path)
        if latest is None:
            continue
        groups, meta = load_checkpoint(latest)
        v = meta["value"]
        assert torch.all(groups["a"]["w"] == v) and torch.all(groups["b"]["w"] == -v) and meta["step"] == int(v)
        step = meta["step"] + 1
    assert step > 0, "no checkpoint completed before any kill"
    assert interrupted, "no kill landed inside a write"


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    lambda p: torch.optim.SGD([{"params": p[:2], "lr": 0.2}, {"params": p[2:], "momentum": 0.5}], lr=0.1),
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05),
], ids=["sgd-nesterov", "sgd-groups", "adamw"])
def test_optimizer_resume_is_bit_identical(tmp_path, make_opt):
    model = _net()
    opt = make_opt(list(model.parameters()))
    _train(model, opt, 3, seed=1)
    tensors, layout = optimizer_to_tensors(opt)
    json.dumps(layout)  # the layout goes into meta.json
    path = save_checkpoint(tmp_path, 3, {"student": model.state_dict(), "optimizer": tensors}, {"optimizer": layout})

    groups, meta = load_checkpoint(path)
    fresh = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    fresh.load_state_dict(groups["student"])
    fresh_opt = make_opt(list(fresh.parameters()))
    optimizer_from_tensors(fresh_opt, groups["optimizer"], meta["optimizer"])
    _train(model, opt, 3, seed=2)
    _train(fresh, fresh_opt, 3, seed=2)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_opt.param_groups[0].keys() == opt.param_groups[0].keys()
    if "betas" in opt.param_groups[0]:
        assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.95)


def _draws():
    return (torch.rand(3), torch.randn(2), np.random.rand(2), np.random.randn(), random.random(), random.gauss(0, 1))


def test_rng_round_trip(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn(), random.gauss(0, 1)  # leave cached Gaussians in numpy and random
    path = save_checkpoint(tmp_path, 0, {"rng": rng_state()}, {})
    expected = _draws()
    set_rng_state(load_checkpoint(path)[0]["rng"])
    again = _draws()
    for a, b in zip(expected, again, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b)


def _perturb_bn(net: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval outputs depend on them."""
    with torch.no_grad():
        net.train()(torch.randn(4, 3, 32, 32))
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)


def test_export_backbone_loads_into_torchvision(tmp_path):
    torch.manual_seed(0)
    backbone = resnet_backbone("resnet18")
    _perturb_bn(backbone)
    file = export_backbone(tmp_path, backbone)
    assert file == tmp_path / "backbone.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    m = torchvision.models.resnet18()
    result = m.load_state_dict(load_file(file), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    m.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    expected = backbone.eval()(x)
    assert torch.allclose(m.eval()(x), expected, atol=1e-6)
    assert torch.allclose(load_backbone(file)(x), expected, atol=1e-6)


def test_export_cifar_stem_backbone(tmp_path):
    torch.manual_seed(0)
    backbone = resnet_backbone("resnet18", cifar_stem=True)
    _perturb_bn(backbone)
    file = export_backbone(tmp_path / "teacher.safetensors", torch.compile(backbone))  # wrappers are removed
    x = torch.randn(2, 3, 32, 32)
    expected = backbone.eval()(x)
    restored = load_backbone(file)
    assert not restored.training and tuple(restored.conv1.kernel_size) == (3, 3)
    assert torch.allclose(restored(x), expected, atol=1e-6)
    m = torchvision.models.resnet18()  # the documented manual route: the CIFAR stem first
    m.conv1, m.maxpool, m.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    m.load_state_dict(load_file(file))
    assert torch.allclose(m.eval()(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        export_backbone(tmp_path, nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="not a fastse-backbone"):
        load_backbone(save_checkpoint(tmp_path, 0, {"student": backbone.state_dict()}, {}) / "student.safetensors")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_optimizer_state_of_channels_last_weights_resumes_into_a_fused_step(tmp_path, fused):
    """The file holds momentum buffers contiguous; a channels_last conv weight must get its buffer back in
    its own layout, or the fused SGD kernel refuses the step (seen resuming FixMatch on CUDA)."""
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)).to(memory_format=torch.channels_last)
        return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=fused,
                                    foreach=None if fused else True)

    def step(net, opt, seed):
        g = torch.Generator().manual_seed(seed)
        opt.zero_grad()
        net(torch.randn(2, 3, 6, 6, generator=g).to(memory_format=torch.channels_last)).square().mean().backward()
        opt.step()

    net, opt = make()
    step(net, opt, 1)
    tensors, layout = optimizer_to_tensors(opt)
    path = save_checkpoint(tmp_path, 1, {"net": net.state_dict(), "optimizer": tensors}, {"optimizer": layout})
    groups, meta = load_checkpoint(path)
    fresh, fresh_opt = make()
    fresh.load_state_dict(groups["net"])
    optimizer_from_tensors(fresh_opt, groups["optimizer"], meta["optimizer"])
    weight = fresh[0].weight
    assert fresh_opt.state[weight]["momentum_buffer"].stride() == weight.stride()  # channels_last, like the weight
    step(net, opt, 2)
    step(fresh, fresh_opt, 2)
    for a, b in zip(net.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
