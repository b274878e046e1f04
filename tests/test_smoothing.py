"""fastse.smoothing on CPU: semantics against a naive per-fragment reference, rates, DDP, resume, errors."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from fastse import philox
from fastse.smoothing import Smoother, cosine_momentum, make_teacher, smooth_, unwrap

RULES, GRANS = ("ema", "se", "sts"), ("tensor", "channel", "element")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def perturb(model: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def reference_step(teacher, student, rule, keep_prob, m, granularity, key):
    """The update written fragment by fragment, straight from the paper's table."""
    base = 0
    for tp, sp in zip(teacher, student):
        t, s = tp.data.view(-1), sp.data.view(-1)
        if granularity == "tensor":
            n_frag = 1
        elif granularity == "channel" and tp.dim() >= 2:
            n_frag = tp.shape[0]
        else:
            n_frag = t.numel()
        per = t.numel() // n_frag
        u = philox.uniform(key, base, n_frag)
        for j in range(n_frag):
            sl = slice(j * per, (j + 1) * per)
            if rule != "ema" and u[j] < keep_prob:
                continue
            t[sl] = s[sl] if rule == "se" else torch.lerp(t[sl], s[sl], 1 - m)
        base += n_frag if granularity != "element" else -(-n_frag // 8) * 8


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("granularity", GRANS)
def test_matches_naive_reference(rule, granularity):
    student = net()
    fast, ref = make_teacher(student), make_teacher(student)
    perturb(fast)
    ref.load_state_dict(fast.state_dict())
    sm = Smoother(student, fast, rule=rule, keep_prob=0.6, momentum=0.9, granularity=granularity, seed=7)
    for step in range(4):
        perturb(student)
        sm.step()
        reference_step(list(ref.parameters()), list(student.parameters()), rule, 0.6, 0.9, granularity,
                       philox.step_key(7, step))
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), (step, name)


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("rule", ["se", "sts"])
def test_keep_prob_extremes(rule, granularity):
    student = net()
    teacher = make_teacher(student)
    perturb(teacher)
    before = [p.clone() for p in teacher.parameters()]
    Smoother(student, teacher, rule=rule, keep_prob=1.0, granularity=granularity).step()
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), before))
    sm = Smoother(student, teacher, rule=rule, keep_prob=0.0, momentum=0.5, granularity=granularity)
    sm.step()
    assert sm.stats()["updated_fraction"] == 1.0
    for a, b, s in zip(teacher.parameters(), before, student.parameters()):
        expected = s if rule == "se" else torch.lerp(b, s, 0.5)
        assert torch.equal(a, expected)


@pytest.mark.parametrize("granularity,steps,tol",
                         [("tensor", 600, 0.02), ("channel", 100, 0.01), ("element", 20, 0.005)])
def test_update_fraction_matches_one_minus_keep_prob(granularity, steps, tol):
    student = net()
    sm = Smoother(student, make_teacher(student), rule="sts", keep_prob=0.7, granularity=granularity, seed=1)
    fractions = []
    for _ in range(steps):
        sm.step()
        fractions.append(sm.stats()["updated_fraction"])
    assert abs(sum(fractions) / steps - 0.3) < tol


def test_ema_is_the_moving_average_and_ignores_keep_prob():
    student = net()
    teacher = make_teacher(student)
    perturb(teacher)
    expected = [torch.lerp(t, s, 0.01) for t, s in zip(teacher.parameters(), student.parameters())]
    sm = Smoother(student, teacher, rule="ema", keep_prob=1.0, momentum=0.99)
    sm.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), expected))
    assert sm.stats()["updated_fraction"] == 1.0


def test_momentum_override_for_one_step():
    student = net()
    teacher = make_teacher(student)
    perturb(teacher)
    sm = Smoother(student, teacher, rule="ema", momentum=0.99)
    sm.step(momentum=0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))
    assert sm.momentum == 0.99


def test_resume_from_state_dict_is_bit_identical():
    student = net()
    t1 = make_teacher(student)
    sm1 = Smoother(student, t1, rule="sts", keep_prob=0.5, granularity="channel", seed=11)
    students = []
    for _ in range(3):
        perturb(student)
        students.append({k: v.clone() for k, v in student.state_dict().items()})
        sm1.step()
    saved_teacher, saved_state = {k: v.clone() for k, v in t1.state_dict().items()}, sm1.state_dict()
    for _ in range(3):
        perturb(student)
        students.append({k: v.clone() for k, v in student.state_dict().items()})
        sm1.step()
    # a fresh process: new objects, different constructor seed, state restored from the checkpoint
    s2, t2 = net(), net()
    t2.load_state_dict(saved_teacher)
    sm2 = Smoother(s2, t2, rule="sts", keep_prob=0.5, granularity="channel", seed=999)
    sm2.load_state_dict(saved_state)
    for k in range(3, 6):
        s2.load_state_dict(students[k])
        sm2.step()
    for a, b in zip(t1.parameters(), t2.parameters()):
        assert torch.equal(a, b)
    assert sm2.state_dict() == sm1.state_dict()


def test_buffer_modes():
    student = net()
    student.train()(torch.randn(4, 3, 8, 8))  # moves BN running stats and num_batches_tracked
    bn_s = student[1]
    for mode in ("keep", "copy", "ema"):
        teacher = make_teacher(net())
        bn_t = teacher[1]
        before = bn_t.running_mean.clone()
        Smoother(student, teacher, rule="ema", momentum=0.9, buffers=mode).step()
        if mode == "keep":
            assert torch.equal(bn_t.running_mean, before) and bn_t.num_batches_tracked == 0
        elif mode == "copy":
            assert torch.equal(bn_t.running_mean, bn_s.running_mean)
            assert bn_t.num_batches_tracked == bn_s.num_batches_tracked
        else:
            assert torch.equal(bn_t.running_mean, torch.lerp(before, bn_s.running_mean, 0.1))
            assert bn_t.num_batches_tracked == bn_s.num_batches_tracked


def test_mismatches_fail_at_construction_naming_the_first():
    student = net()
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 6))
    with pytest.raises(ValueError, match=r"4\.weight.*\(5, 288\) vs \(6, 288\)|4\.weight"):
        Smoother(student, other)
    with pytest.raises(ValueError, match="dtype"):
        Smoother(student, make_teacher(student).double())
    renamed = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match="only the student has parameter '1.weight'"):
        Smoother(student, renamed)
    for kw, msg in [({"rule": "tma"}, "rule"), ({"granularity": "layer"}, "granularity"),
                    ({"keep_prob": 1.5}, "keep_prob"), ({"buffers": "avg"}, "buffers")]:
        with pytest.raises(ValueError, match=msg):
            Smoother(student, make_teacher(student), **kw)


def test_make_teacher_and_unwrap():
    student = net()
    compiled = torch.compile(student)  # wrapping only: nothing is compiled until called
    teacher = make_teacher(compiled)
    assert unwrap(compiled) is student
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr()
               for a, b in zip(teacher.parameters(), student.parameters()))
    Smoother(compiled, teacher).step()


def test_cosine_momentum():
    assert cosine_momentum(0, 100) == pytest.approx(0.99)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(50, 100) == pytest.approx(0.995)
    assert cosine_momentum(25, 100, base=0.9, final=1.0) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_functional_smooth_with_a_generator():
    student = net()
    a, b = make_teacher(student), make_teacher(student)
    perturb(a)
    b.load_state_dict(a.state_dict())
    for model in (a, b):
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            smooth_(list(model.parameters()), list(student.parameters()), rule="se", keep_prob=0.5,
                    granularity="element", generator=gen)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    changed = sum(int((x != y).sum()) for x, y in zip(a.parameters(), make_teacher(student).parameters()))
    assert 0 < changed


@pytest.mark.parametrize("granularity", GRANS)
def test_functional_smooth_holds_its_tensors_weakly_and_reuses_its_plan(granularity):
    import gc
    import weakref

    from fastse import smoothing

    def pair():
        student = net()
        return student, make_teacher(student)

    def step(student, teacher):
        smooth_(list(teacher.parameters()), list(student.parameters()), rule="sts", granularity=granularity,
                generator=1)

    before = dict(smoothing._PLANS)
    student, teacher = pair()
    step(student, teacher)
    step(student, teacher)  # live tensors: the same plan again
    mine = [k for k in smoothing._PLANS if k not in before]
    assert len(mine) == 1
    plan = smoothing._PLANS[mine[0]]
    step(student, teacher)
    assert smoothing._PLANS[mine[0]] is plan
    gone = [weakref.ref(p) for p in (*student.parameters(), *teacher.parameters())]
    storage = weakref.ref(next(teacher.parameters()).untyped_storage())
    del student, teacher, plan
    gc.collect()
    assert not any(r() is not None for r in gone) and storage() is None  # the cache kept none of them alive
    assert not any(k in smoothing._PLANS for k in mine)  # nor their plan
    student, teacher = pair()  # a new model: a plan of its own, which matches a plain Smoother's update
    reference = make_teacher(student)
    perturb(student)
    step(student, teacher)
    sm = Smoother(student, reference, rule="sts", granularity=granularity)
    sm._plan.run("sts", 1, 0.7, 1 - 0.99)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), reference.parameters()))


def test_philox_known_answer():
    # Random123's known-answer vector for Philox4x32-10, counter 0, key 0
    assert philox.philox4x32(0, torch.tensor([0]))[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    u = philox.uniform(3, 5, 50)
    assert torch.equal(u[10:20], philox.uniform(3, 15, 10))


def plain_philox(key: int, counter: int) -> list[int]:
    """Philox4x32-10 of counter (counter, 0, 0, 0) with a 64-bit key, in Python integers (Salmon et al. 2011)."""
    c, k, m = [counter & 0xFFFFFFFF, counter >> 32, 0, 0], [key & 0xFFFFFFFF, key >> 32], 0xFFFFFFFF
    for _ in range(10):
        pa, pb = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        c = [(pb >> 32) ^ c[1] ^ k[0], pb & m, (pa >> 32) ^ c[3] ^ k[1], pa & m]
        k = [(k[0] + 0x9E3779B9) & m, (k[1] + 0xBB67AE85) & m]
    return c


def test_philox_matches_a_plain_python_philox():
    keys = [0, 1, 2**63 + 12345, 0xFFFFFFFFFFFFFFFF, philox.step_key(7, 3)]
    counters = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 5, 2**62 + 3]
    for key in keys:
        got = philox.philox4x32(key, torch.tensor(counters)).tolist()
        assert got == [plain_philox(key, c) for c in counters], key
        words = [w for c in range(4, 7) for w in plain_philox(key, c)]
        halves = [h for w in words for h in (w & 0xFFFF, w >> 16)]
        assert philox.uniform(key, 37, 11).tolist() == [h / 65536 for h in halves[5:16]]


def per_tensor_step(teacher, student, rule, keep_prob, m, granularity, key):
    """The update tensor by tensor (one draw, mask and `torch.where` each), in memory order; returns the
    number of fragments updated."""
    base, updated = 0, 0
    for tp, sp in zip(teacher, student):
        t, s = (x.data.as_strided((x.numel(),), (1,)) for x in (tp, sp))  # memory order, channels_last too
        n_frag = 1 if granularity == "tensor" else tp.shape[0] if granularity == "channel" and tp.dim() >= 2 \
            else t.numel()
        update = torch.ones(n_frag, dtype=torch.bool)
        if rule != "ema":
            update = philox.uniform(key, base, n_frag) >= keep_prob
        updated += int(update.sum())
        new = s if rule == "se" else torch.lerp(t, s, 1 - m)
        t.copy_(torch.where(update.repeat_interleave(t.numel() // n_frag if n_frag else 0), new, t))
        base += n_frag if granularity != "element" else -(-n_frag // 8) * 8
    return updated


class Mixed(nn.Module):
    """Three (device, dtype) groups whose tensors interleave, a channels_last kernel, an empty tensor, sizes
    that are not multiples of 8."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Parameter(torch.randn(6, 3, 3, 3).to(memory_format=torch.channels_last))
        self.scale = nn.Parameter(torch.randn(13, dtype=torch.float64))
        self.empty = nn.Parameter(torch.empty(0, 3))
        self.proj = nn.Parameter(torch.randn(5, 7).to(torch.bfloat16))
        self.bias = nn.Parameter(torch.randn(21))
        self.fc = nn.Parameter(torch.randn(9, 300))
        self.gain = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))


def bits(t: Tensor) -> Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("granularity", GRANS)
def test_torch_path_matches_per_tensor_reference_bitwise(rule, granularity):
    student = Mixed()
    fast, ref = make_teacher(student), make_teacher(student)
    with torch.no_grad():
        for a, b in zip(fast.parameters(), ref.parameters()):
            a.normal_().as_strided((a.numel(),), (1,))[::5] = -0.0  # kept negative zeros must stay negative
            b.copy_(a)
        student.fc[2, 7] = float("inf")  # an infinite student must not reach kept teacher fragments
    keep_prob = 45875 / 65536 + 1e-12  # rounds to 45875 / 65536 in float32, the precision masks compare in
    sm = Smoother(student, fast, rule=rule, keep_prob=keep_prob, momentum=0.9, granularity=granularity, seed=4)
    for step in range(3):
        sm.step()
        updated = per_tensor_step(list(ref.parameters()), list(student.parameters()), rule, keep_prob, 0.9,
                                  granularity, philox.step_key(4, step))
        assert sm.stats()["updated_fraction"] == updated / sm._plan.n_frag
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            assert torch.equal(bits(a), bits(b)), (step, name)
            assert a.stride() == b.stride()


@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("rule", ["se", "sts"])
def test_torch_path_runs_a_fixed_number_of_ops_whatever_the_tensor_count(rule, granularity):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n_layers in (2, 20):
        student = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n_layers)])
        sm = Smoother(student, make_teacher(student), rule=rule, granularity=granularity)
        sm.step()  # builds the flat buffers
        with CountOps() as mode:
            sm.step()
        counts.append(mode.ops)
    assert counts[0] == counts[1]


def _ddp_worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    student = net()
    ddp = nn.parallel.DistributedDataParallel(student)
    teacher = make_teacher(ddp)
    sm = Smoother(ddp, teacher, rule="sts", keep_prob=0.7, granularity="element", seed=3)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # every rank sees different data
    for _ in range(5):
        loss = ddp(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sm.step()
    flat = torch.cat([p.view(-1) for p in teacher.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    out[rank] = all(torch.equal(gathered[0], g) for g in gathered) and not torch.equal(
        flat, torch.cat([p.view(-1) for p in student.parameters()]))
    dist.destroy_process_group()


def test_two_gloo_ranks_end_with_identical_teachers():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
        assert dict(out) == {0: True, 1: True}
