"""The fused Triton kernels against the torch path on a CUDA device (skipped where there is none)."""

import pytest
import torch
from torch import nn

from fastse.smoothing import Smoother, make_teacher

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"), pytest.mark.gpu]


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


@pytest.mark.parametrize("rule", ["se", "sts"])
@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_torch_path_on_cuda_matches_cpu(rule, granularity):
    """CUDA without Triton draws the same masks as the CPU (its Philox words included) and updates the same
    elements; se copies bit for bit, sts's lerp may round differently on the two devices (fp32 ulp)."""
    cpu_student = _net(torch.float32).cpu()
    cpu_teacher = make_teacher(cpu_student)
    with torch.no_grad():
        for p in cpu_teacher.parameters():
            p.normal_()
    gpu_student, gpu_teacher = make_teacher(cpu_student).cuda(), make_teacher(cpu_teacher).cuda()
    kw = dict(rule=rule, keep_prob=0.6, momentum=0.9, granularity=granularity, seed=5, kernel="torch")
    on_cpu, on_gpu = Smoother(cpu_student, cpu_teacher, **kw), Smoother(gpu_student, gpu_teacher, **kw)
    for _ in range(3):
        before = [p.clone() for p in cpu_teacher.parameters()]
        on_cpu.step()
        on_gpu.step()
        assert on_cpu.stats()["updated_fraction"] == on_gpu.stats()["updated_fraction"]
        for (name, x), y, x0 in zip(cpu_teacher.named_parameters(), gpu_teacher.parameters(), before):
            y = y.cpu()
            assert torch.equal(x != x0, y != x0), name  # the same elements updated
            if rule == "se":
                assert torch.equal(x, y), name
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("granularity", ["channel", "element"])
def test_torch_path_on_cuda_runs_the_jiterator_kernel_for_float32(granularity):
    """CUDA without Triton: float32 groups update through the jiterator kernel and one foreach lerp (what
    `benchmarks/teacher_update.py --kernels torch` times); other dtypes through the plain torch ops."""
    from fastse.smoothing import _FlatUpdate, _JitUpdate

    for dtype, path in ((torch.float32, _JitUpdate), (torch.bfloat16, _FlatUpdate)):
        student = _net(dtype, channels_last=True)
        sm = Smoother(student, make_teacher(student), rule="sts", granularity=granularity, kernel="torch")
        sm.step()
        assert [type(g.flat) for g in sm._plan.groups] == [path], dtype
