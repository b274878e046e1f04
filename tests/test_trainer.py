"""The pretraining loop on real CIFAR-10 JPEGs (a small copied subset, 16 px crops, CPU): 20-step runs of
both methods with every teacher rule, checkpoints, bit-identical resume, 2-process gloo DDP, the
exported backbone, the optimizers and schedules, and the run log."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastse.checkpoints import latest_checkpoint, load_checkpoint
from fastse.engine.logging import RunLog, wandb_mode
from fastse.engine.optim import LARS, build_optimizer, lr_at
from fastse.pretrain.config import PretrainConfig
from fastse.pretrain.trainer import Trainer, TrainingError, train

TRAIN_PER_CLASS, TEST_PER_CLASS = 8, 4  # 80 train images: 10 steps an epoch at batch 8


@pytest.fixture(scope="module")
def tiny_cifar(cifar_subset) -> Path:
    """8 train and 4 test real CIFAR-10 JPEGs of each class."""
    return cifar_subset(TRAIN_PER_CLASS, TEST_PER_CLASS)


def small(data: Path, out: Path, **changes) -> PretrainConfig:
    """A ResNet-18 (CIFAR stem) run at 16 px with narrow heads: 10 steps an epoch, 2 epochs."""
    base = dict(arch="resnet18", cifar_stem=True, data=str(data), dataset="cifar10", image_size=16, epochs=2,
                batch_size=8, lr=0.05, proj_hidden_dim=128, proj_dim=32, pred_hidden_dim=128, queue_size=32,
                log_every=5, knn_every=1, knn_k=20, out=str(out), wandb="disabled", cache_dir=str(out.parent / "cache"))
    return PretrainConfig(**{**base, **changes})


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _without_wall(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "wall_s"} for line in lines]


@pytest.mark.parametrize("method,rule,granularity", [  # element masks are slow on CPU: tested in test_smoothing
    ("byol", "ema", "element"), ("byol", "se", "channel"), ("byol", "sts", "tensor"),
    ("mocov2", "ema", "element"), ("mocov2", "se", "tensor"), ("mocov2", "sts", "channel"),
])
def test_twenty_steps(tiny_cifar, tmp_path, method, rule, granularity):
    out = tmp_path / "run"
    trainer = Trainer(small(tiny_cifar, out, method=method, rule=rule, granularity=granularity))
    initial = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    result = trainer.fit()
    assert result["step"] == 20 and math.isfinite(result["loss"])
    assert 0 <= result["knn_top1"] <= 100 and result["knn_top1"] <= result["knn_top5"]
    lines = _lines(out)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [5, 10, 15, 20]
    assert all(math.isfinite(m["loss"]) and m["lr"] > 0 and m["img_per_s"] > 0 for m in steps)
    assert sum("knn_top1" in m for m in lines) == 2  # after epoch 1 and at the end
    fractions = [m["updated_fraction"] for m in steps]
    if rule == "ema":
        assert fractions == [1.0] * 4
    else:
        assert all(0 < f < 1 for f in fractions) and len(set(fractions)) > 1  # fresh masks every step
    momenta = [m["momentum"] for m in steps]
    if method == "mocov2":
        assert momenta == [0.999] * 4  # constant
    else:
        assert 0.99 <= momenta[0] < momenta[-1] < 1  # cosine from 0.99 towards 1
    moved = [k for k, v in trainer.method.teacher.state_dict().items() if v.is_floating_point()
             and not torch.equal(v, initial[k])]
    assert moved, "the teacher never changed"
    assert all(m["distance"] > 0 for m in steps)


@pytest.fixture(scope="module")
def finished(tiny_cifar, tmp_path_factory):
    """A finished BYOL+STS run: (trainer, result)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    trainer = Trainer(small(tiny_cifar, out, knn_every=0, ckpt_every=1, keep_ckpts=1))
    return trainer, trainer.fit()


def test_checkpoint_round_trip(finished):
    trainer, result = finished
    path = latest_checkpoint(trainer.out)
    assert str(path) == result["checkpoint"] and path.name == "step-000000020"
    assert [p.name for p in (trainer.out / "checkpoints").iterdir()] == [path.name]  # keep_ckpts=1
    groups, meta = load_checkpoint(path)
    for name, module in (("student", trainer.method.student), ("teacher", trainer.method.teacher)):
        state = module.state_dict()
        assert groups[name].keys() == state.keys()
        assert all(torch.equal(groups[name][k], state[k]) for k in state)
    assert meta["step"] == 20 and meta["epoch"] == 2 and meta["smoother"] == trainer.smoother.state_dict()
    assert meta["config"] == trainer.config.to_dict()
    fresh = Trainer(trainer.config, resume=True)
    assert fresh.step == 20 and fresh.smoother.steps == 20
    assert all(torch.equal(a, b) for a, b in zip(fresh.method.state_dict().values(),
                                                  trainer.method.state_dict().values()))
    opt_a, opt_b = fresh.optimizer.state_dict()["state"], trainer.optimizer.state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]) for i in opt_a)
    fresh.close()


def test_exported_backbone_loads_into_torchvision(finished):
    import torchvision
    from safetensors.torch import load_file

    trainer, result = finished
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem
    net.maxpool = torch.nn.Identity()
    missing, unexpected = net.load_state_dict(load_file(result["backbone"]), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.fc = torch.nn.Identity()
    # like with like: both nets in the teacher's memory format on the same input, so the same conv kernels
    # run; the tolerance covers fp32 summation order (CPU kernels differ by machine: 1.9e-5 was seen)
    teacher = trainer.method.backbone.eval()
    fmt = torch.channels_last if teacher.conv1.weight.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=fmt)
    torch.testing.assert_close(net.eval().to(memory_format=fmt)(x), teacher(x), rtol=1e-4, atol=1e-4)


def test_refuses_to_overwrite_a_run_without_resume(finished):
    from fastse.checkpoints import CheckpointError

    trainer, _ = finished
    with pytest.raises(CheckpointError, match="resume"):
        Trainer(trainer.config)


def test_interrupted_and_resumed_run_is_bit_identical(tiny_cifar, tmp_path):
    # MoCo (queue) with LARS, warmup and a cosine teacher schedule: every kind of state must resume
    common = dict(method="mocov2", optimizer="lars", lr=0.5, warmup_epochs=1, momentum=0.99,
                  momentum_schedule="cosine", knn_every=0, deterministic=True)
    train(small(tiny_cifar, tmp_path / "a", **common))
    stopped = train(small(tiny_cifar, tmp_path / "b", max_steps=7, **common))  # mid-epoch
    assert stopped["step"] == 7 and latest_checkpoint(tmp_path / "b").name == "step-000000007"
    train(small(tiny_cifar, tmp_path / "b", **common), resume=True)
    (ga, ma), (gb, mb) = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in "ab")
    assert ma["step"] == mb["step"] == 20 and ma["smoother"] == mb["smoother"]
    assert ga.keys() == gb.keys() == {"student", "teacher", "optimizer", "queue", "rng", "probe"}  # online probe
    for group in ("student", "teacher", "optimizer", "queue", "probe"):
        assert ga[group].keys() == gb[group].keys()
        different = [k for k in ga[group] if not torch.equal(ga[group][k], gb[group][k])]
        assert not different, f"{group}: {different[:3]}"
    steps_a = {m["step"]: m["loss"] for m in _lines(tmp_path / "a") if "loss" in m}
    steps_b = {m["step"]: m["loss"] for m in _lines(tmp_path / "b") if "loss" in m}
    assert steps_a[15] == steps_b[15] and steps_a[20] == steps_b[20]  # (b's step-10 line averages steps 8-10 only)


def test_nonfinite_loss_stops_naming_the_step(tiny_cifar, tmp_path):
    trainer = Trainer(small(tiny_cifar, tmp_path / "run", log_every=3))
    real = trainer.method.forward
    trainer.method.forward = lambda views: real(views) * (float("nan") if trainer.step == 4 else 1.0)
    with pytest.raises(TrainingError, match="at step 6"):
        trainer.fit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank `rank` of `world` for the trainer's torchrun-style start."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _ddp_rank(rank: int, world: int, port: int, config: PretrainConfig) -> None:
    _as_rank(rank, world, port)
    trainer = Trainer(config)
    trainer.fit()
    torch.save({"teacher": trainer.method.teacher.state_dict(), "queue": trainer.method.queue,
                "student": trainer.method.student.state_dict()}, Path(config.out) / f"rank{rank}.pt")


def test_two_process_gloo_ddp_keeps_identical_teachers(tiny_cifar, tmp_path):
    config = small(tiny_cifar, tmp_path / "run", method="mocov2", batch_size=16, max_steps=6, knn_every=0)
    mp.spawn(_ddp_rank, args=(2, _free_port(), config), nprocs=2)
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1))
    for part in ("teacher", "student"):
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    assert torch.equal(r0["queue"], r1["queue"])
    groups, meta = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert meta["world_size"] == 2 and meta["step"] == 6
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [m["teacher_checksum"] for m in lines if "loss" in m]  # at every metrics line
    assert logged and all(len(c) == 2 for c in logged)
    assert [m["step"] for m in lines if m.get("teacher_bit_identical")] == [6]  # and every byte at the end
    assert all(torch.equal(groups["teacher"][k], r0["teacher"][k]) for k in r0["teacher"])


def _signal_rank(rank: int, world: int, port: int, config: PretrainConfig, signalled: int, out: Path) -> None:
    _as_rank(rank, world, port)
    trainer = Trainer(config)
    step = trainer.train_step

    def train_step(views):
        if rank == signalled and trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # one rank only, between log lines
        return step(views)

    trainer.train_step = train_step
    result = trainer.fit()
    (out / f"rank{rank}.json").write_text(json.dumps({"step": result["step"], "stopped": result["stopped"]}))


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tiny_cifar, tmp_path):
    config = small(tiny_cifar, tmp_path / "run", method="mocov2", batch_size=16, knn_every=0, log_every=2)
    mp.spawn(_signal_rank, args=(2, _free_port(), config, 1, tmp_path), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == {"step": 4, "stopped": "a stop signal to another process"} and r1 == {"step": 4, "stopped": "SIGTERM"}
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))[1]["step"] == 4


def _stuck_peer_rank(rank: int, world: int, port: int, config: PretrainConfig, marker: Path) -> None:
    """Rank 1 stops answering at step 3 (alive, out of every collective), as a rank that is gone."""
    from fastse.engine import base

    base.STOP_GRACE_S = 1.0
    _as_rank(rank, world, port)
    trainer = Trainer(config)
    step = trainer.train_step

    def train_step(views):
        if rank == 1 and trainer.step == 3:
            marker.write_text("stuck")
            time.sleep(300)
        return step(views)

    trainer.train_step = train_step
    trainer.fit()


def test_a_signalled_rank_whose_peer_is_gone_exits_instead_of_waiting_for_it(tiny_cifar, tmp_path):
    """A collective with a stuck peer never returns, so the stop at the next log line cannot come: the
    signalled rank exits after the watchdog's grace (here 1 s) with 128 + SIGTERM, as torchrun expects."""
    config = small(tiny_cifar, tmp_path / "run", method="mocov2", batch_size=16, knn_every=0, log_every=2)
    context, marker, port = mp.get_context("spawn"), tmp_path / "stuck", _free_port()
    ranks = [context.Process(target=_stuck_peer_rank, args=(r, 2, port, config, marker)) for r in (0, 1)]
    for process in ranks:
        process.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        time.sleep(1.0)  # rank 0 is now inside step 4's gradient all-reduce, waiting for rank 1
        os.kill(ranks[0].pid, signal.SIGTERM)
        signalled = time.monotonic()
        ranks[0].join(timeout=30)
        assert ranks[0].exitcode == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < 15
    finally:
        for process in ranks:
            process.kill()
            process.join()


def test_sigterm_stops_at_the_next_log_line_with_a_checkpoint_and_resume_is_bit_identical(tiny_cifar, tmp_path):
    common = dict(method="byol", epochs=1, knn_every=0, deterministic=True, log_every=3)
    train(small(tiny_cifar, tmp_path / "a", **common))
    trainer = Trainer(small(tiny_cifar, tmp_path / "b", **common))
    step = trainer.train_step
    trainer.train_step = lambda views: (trainer.step == 2 and os.kill(os.getpid(), signal.SIGTERM)) or step(views)
    previous = signal.getsignal(signal.SIGTERM)
    stopped = trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is fit's only
    assert stopped["stopped"] == "SIGTERM" and stopped["step"] == 3  # mid-epoch (10 steps an epoch)
    assert "knn_top1" not in stopped and not (tmp_path / "b" / "backbone.safetensors").exists()  # not finished
    assert latest_checkpoint(tmp_path / "b").name == "step-000000003"
    assert {"step": 3, "stopped": "SIGTERM"}.items() <= _lines(tmp_path / "b")[-1].items()
    finished = train(small(tiny_cifar, tmp_path / "b", **common), resume=True)
    assert finished["step"] == 10 and "stopped" not in finished
    (ga, _), (gb, _) = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in "ab")
    for group in ("student", "teacher", "optimizer"):
        assert all(torch.equal(ga[group][k], gb[group][k]) for k in ga[group]), group


def test_ctrl_c_stops_with_a_checkpoint_and_a_second_one_at_once(tiny_cifar, tmp_path):
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN under nohup / `cmd &`
    for presses, out in ((1, tmp_path / "once"), (2, tmp_path / "twice")):
        trainer = Trainer(small(tiny_cifar, out, epochs=1, knn_every=0, log_every=4))
        step = trainer.train_step

        def train_step(views, trainer=trainer, step=step, presses=presses):
            if trainer.step == 1:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)
            return step(views)

        trainer.train_step = train_step
        if presses == 1:
            assert trainer.fit()["stopped"] == "SIGINT" and latest_checkpoint(out).name == "step-000000004"
        else:
            with pytest.raises(KeyboardInterrupt):
                trainer.fit()
            assert latest_checkpoint(out) is None  # stopped before its first checkpoint
    assert signal.getsignal(signal.SIGINT) is before  # put back


def test_time_limit_stops_with_a_checkpoint_and_exit_3_then_resume_finishes(tiny_cifar, tmp_path):
    from click.testing import CliRunner
    from fastse.cli.main import main

    out = tmp_path / "run"
    args = ["pretrain", "--data", str(tiny_cifar), "--dataset", "cifar10", "--image-size", "16", "--epochs", "1",
            "--batch-size", "8", "--knn-every", "0", "--log-every", "3", "--out", str(out), "--wandb", "disabled",
            "--cache-dir", str(tmp_path / "cache")]
    stopped = CliRunner().invoke(main, [*args, "--time-limit", "1e-6"])
    assert stopped.exit_code == 3, stopped.output
    assert "stopped at step 3 of 10 (the time limit of 1e-06 min)" in stopped.output and "--resume" in stopped.output
    assert latest_checkpoint(out).name == "step-000000003"
    finished = CliRunner().invoke(main, [*args, "--resume"])
    assert finished.exit_code == 0, finished.output
    assert load_checkpoint(latest_checkpoint(out))[1]["step"] == 10
    bad = CliRunner().invoke(main, [*args, "--time-limit", "0"])
    assert bad.exit_code == 2 and "--time-limit=0.0 must be > 0 (minutes)" in bad.output


# ------------------------------------------------------------------------- optimizers, schedule, log


def test_lr_schedule_warms_up_then_follows_a_cosine():
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)


def test_lars_matches_a_reference_and_skips_biases_and_norms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, "lars", lr=0.1, momentum=0.9, weight_decay=0.01)
    assert isinstance(opt, LARS)
    bufs = {n: torch.zeros_like(p) for n, p in reference.items()}
    for _ in range(3):
        model(torch.randn(8, 4)).square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for n, w in reference.items():
            g = grads[n]
            if w.ndim > 1:  # weights: decay and trust ratio
                g = g + 0.01 * w
                g = g * (0.001 * w.norm() / g.norm())
            bufs[n] = 0.9 * bufs[n] + g
            reference[n] = w - 0.1 * bufs[n]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n])


def test_knn_student_measures_the_student_beside_the_teacher(tiny_cifar, tmp_path):
    """momentum 0 with copied buffers makes the teacher the student: equal scores; momentum 1 leaves the
    teacher at its start while the student trains: the student's own network is measured."""
    scores = {}
    for momentum in (0.0, 1.0):
        out = tmp_path / f"m{momentum:g}"
        config = small(tiny_cifar, out, rule="ema", momentum=momentum, momentum_schedule="constant",
                       buffers="copy", knn_student=True, epochs=1, lr=0.5)
        result = Trainer(config).fit()
        knn = [m for m in _lines(out) if "knn_top1" in m]
        assert len(knn) == 1 and {"knn_student_top1", "knn_student_top5"} <= knn[0].keys()
        scores[momentum] = (result["knn_top1"], result["knn_top5"], result["knn_student_top1"],
                            result["knn_student_top5"])
    assert scores[0.0][:2] == scores[0.0][2:]
    assert scores[1.0][:2] != scores[1.0][2:]


def test_run_log_writes_jsonl_and_resolves_wandb_mode(tmp_path, monkeypatch):
    run = RunLog(tmp_path / "run", {"a": 1}, wandb="disabled")
    run.log({"step": 1, "loss": 0.5})
    time.sleep(0.02)
    run.log({"step": 2, "loss": float("nan")})
    run.close()
    lines = _lines(tmp_path / "run")
    assert 0 <= lines[0]["wall_s"] < lines[1]["wall_s"] < 60  # seconds since the log opened
    assert _without_wall(lines) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None}]
    RunLog(tmp_path / "other", {}, enabled=False).log({"step": 1})  # ranks other than 0
    assert not (tmp_path / "other").exists()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"  # never the real one
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "offline"  # no file
    netrc.write_text("machine example.com login a password b\n")
    assert wandb_mode("auto") == "offline"
    netrc.write_text("machine api.wandb.ai login user password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_run_log_of_a_resumed_run_drops_the_lines_after_its_checkpoint(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    written = [{"step": 1, "first_step_s": 2.0}, {"step": 2, "loss": 0.5}, {"note": "no step"},
               {"step": 3, "loss": 0.4}, {"step": 4, "loss": 0.3}]
    path.write_text("".join(json.dumps(m) + "\n" for m in written) + '{"step": 5, "lo')  # killed mid-line
    RunLog(path.parent, {}, wandb="disabled", resume_step=None).close()  # a plain RunLog appends
    assert path.read_text().endswith('{"step": 5, "lo')
    run = RunLog(path.parent, {}, wandb="disabled", resume_step=2)  # resumed from the step-2 checkpoint
    run.log({"step": 3, "loss": 0.45})
    run.close()
    assert _without_wall(_lines(tmp_path / "run")) == [*written[:3], {"step": 3, "loss": 0.45}]
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left
    before = path.stat().st_mtime_ns
    RunLog(path.parent, {}, wandb="disabled", resume_step=3).close()  # nothing to drop: not rewritten
    assert path.stat().st_mtime_ns == before
    RunLog(path.parent, {}, wandb="disabled", resume_step=0).close()  # a fresh start over a run that saved nothing
    assert _lines(tmp_path / "run") == [{"note": "no step"}]


def _diverge_worker(rank: int, world: int, port: int, fault: str, out) -> None:
    from fastse.distributed import RanksDiverged, check_same_across_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        for p in teacher.parameters():  # small integers: every sum is exact, whatever the order
            p.copy_(torch.randint(-8, 8, p.shape))
        if rank == 1 and fault == "perturb":
            teacher[1].bias[0] += 1e-6
        if rank == 1 and fault == "swap":  # same sums, different bytes: only the exact check sees it
            w = teacher[0].weight
            w[0, 0], w[0, 1] = w[0, 1].item() + 1, w[0, 0].item() - 1
    try:
        out[rank] = check_same_across_ranks(teacher, exact=True)
    except RanksDiverged as e:
        out[rank] = str(e)
    dist.destroy_process_group()


@pytest.mark.parametrize("fault", ["none", "perturb", "swap"])
def test_diverged_teachers_stop_every_rank(fault):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_diverge_worker, args=(2, port, fault, out), nprocs=2, join=True)
        results = dict(out)
    if fault == "perturb":
        assert all("teacher differs between ranks" in results[r] for r in (0, 1)), results
    elif fault == "swap":
        assert all("differs bitwise from rank 0" in results[r] for r in (0, 1)), results
    else:
        assert results[0] == results[1] and isinstance(results[0], tuple), results  # the shared checksum


@pytest.mark.parametrize("mode,marks", [("default", 0), ("reduce-overhead", 3)])
def test_compile_mode_reaches_torch_compile_and_cuda_graph_steps_are_marked(tiny_cifar, tmp_path, monkeypatch,
                                                                             mode, marks):
    import fastse.engine.base as base

    modes, marked = [], []
    monkeypatch.setattr(base.torch, "compile", lambda fn, **kw: modes.append(kw) or fn)
    monkeypatch.setattr(base.torch.compiler, "cudagraph_mark_step_begin", lambda: marked.append(1))
    Trainer(small(tiny_cifar, tmp_path / "run", compile=True, compile_mode=mode, max_steps=3, knn_every=0)).fit()
    assert modes == [{"dynamic": False, "mode": None if mode == "default" else mode}] * 2  # student, teacher
    assert len(marked) == marks
    with pytest.raises(ValueError, match="compile_mode='fast' is not one of default, reduce-overhead"):
        small(tiny_cifar, tmp_path / "x", compile_mode="fast").validate()
