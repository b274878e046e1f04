"""The fused Triton kernels against the torch path on a CUDA device (skipped where there is none)."""

import pytest
import torch
from torch import nn

from fastse.smoothing import Smoother, make_teacher

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _net(dtype, channels_last=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 130, 5), nn.Flatten(),
                        nn.Linear(130, 4099), nn.Linear(4099, 7)).to("cuda", dtype)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", ["ema", "se", "sts"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "element"])
def test_triton_matches_torch_bitwise(dtype, rule, granularity):
    student = _net(dtype, channels_last=granularity == "element")
    a, b = make_teacher(student), make_teacher(student)
    with torch.no_grad():  # the teachers start elsewhere, so every update is visible
        for x, y in zip(a.parameters(), b.parameters()):
            x.normal_()
            y.copy_(x)
    kw = dict(rule=rule, keep_prob=0.6, momentum=0.9, granularity=granularity, seed=3)
    fast = Smoother(student, a, kernel="triton", **kw)
    ref = Smoother(student, b, kernel="torch", **kw)
    for _ in range(3):
        fast.step()
        ref.step()
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        assert fast.stats()["updated_fraction"] == ref.stats()["updated_fraction"]
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


def test_triton_rebuilds_after_tensors_move():
    student = _net(torch.float32)
    teacher = make_teacher(student)
    sm = Smoother(student, teacher, rule="ema", momentum=0.0, kernel="triton")
    for p in teacher.parameters():
        p.data = p.data.clone()  # new storage: the pointer table must follow
    sm.step()
    for x, y in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rule", ["se", "sts"])
@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_torch_path_steps_without_a_host_sync(rule, granularity):
    student = _net(torch.float32)
    sm = Smoother(student, make_teacher(student), rule=rule, granularity=granularity, kernel="torch")
    sm.step()  # the first step builds the flat buffers and copies their tables to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        sm.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
