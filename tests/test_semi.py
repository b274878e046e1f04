"""`fastse semi` (FixMatch with an EMA / SE / STS teacher) on real CIFAR-10 JPEGs (a small copied subset, a
WRN-10-1, CPU): the loss, schedule and optimizer, 20-step runs of every rule, where pseudo-labels come
from, bit-identical resume, the labeled split, 2-process gloo DDP, and the command line."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner
from fastse.cli import semi as cli
from fastse.cli.main import main
from fastse.pipelines.datasets import DataError, ImageFolderIndex, load_split, scan_image_folder

from fastse.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint
from fastse.models import WideResNet, wrn_28_2, wrn_28_8
from fastse.semi import config as cfg
from fastse.semi.config import PRESETS, SemiConfig, preset
from fastse.semi.data import choose_labeled
from fastse.semi.fixmatch import FixMatch, build_optimizer, fixmatch_loss, fixmatch_lr
from fastse.semi.trainer import SemiTrainer, TrainingError, train

TRAIN_PER_CLASS, TEST_PER_CLASS = 10, 4  # 100 train images: 6 unlabeled and 7 labeled batches an epoch


@pytest.fixture(scope="module")
def tiny_cifar(cifar_subset) -> Path:
    return cifar_subset(TRAIN_PER_CLASS, TEST_PER_CLASS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("semi-cache")


def small(data: Path, out: Path, cache: Path, **changes) -> SemiConfig:
    """A WRN-10-1 on 32 px CIFAR: 20 labeled images, 8 labeled + 16 unlabeled a step, 20 steps."""
    base = dict(data=str(data), dataset="cifar10", num_labels=20, depth=10, widen=1, labeled_batch=8, mu=2,
                total_steps=20, eval_every=10, log_every=5, ckpt_every=10, out=str(out), wandb="disabled",
                device="cpu", compile=False, cache_dir=str(cache))
    return SemiConfig(**{**base, **changes})


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------- loss, schedule, model


def test_fixmatch_loss_keeps_confident_weak_pseudo_labels_and_trains_on_the_strong_view():
    logits_x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 2])
    weak = torch.tensor([[12.0, 0, 0], [0, 0, 0], [0, 0, 12.0], [0, 1.0, 0]], requires_grad=True)
    strong = torch.randn(4, 3, requires_grad=True)
    threshold = weak.detach().softmax(-1).amax(-1)[[0, 2]].min().item()  # exactly at the threshold is kept (>=)
    loss, stats = fixmatch_loss(logits_x, labels, weak, strong, threshold=threshold, lambda_u=0.5,
                                unlabeled_labels=torch.tensor([0, 1, 1, 1]))
    kept = torch.tensor([1.0, 0, 1, 0])
    loss_u = (F.cross_entropy(strong, torch.tensor([0, 0, 2, 1]), reduction="none") * kept).mean()
    loss_x = F.cross_entropy(logits_x, labels)
    torch.testing.assert_close(loss, loss_x + 0.5 * loss_u)
    expected = torch.stack([loss_x + 0.5 * loss_u, loss_x, loss_u, torch.tensor(0.5), torch.tensor(0.25)])
    torch.testing.assert_close(stats, expected.detach())
    loss.backward()
    assert weak.grad is None and strong.grad is not None  # no gradient through the pseudo-labels
    assert torch.equal(strong.grad[1], torch.zeros(3)) and torch.equal(strong.grad[3], torch.zeros(3))


def test_teacher_targets_take_the_pseudo_labels_from_the_teacher():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    weak, strong = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    truth = torch.full((6,), 3)
    student = WideResNet(10, depth=10, widen=1)
    results = {}
    for teacher_targets in (False, True):
        model = FixMatch(student, threshold=0.9, teacher_targets=teacher_targets).train()
        with torch.no_grad():
            model.teacher.fc.bias.copy_((torch.arange(10) == 3) * 100.0)  # a teacher sure of class 3
        logits_x, logits_w, logits_s = student(torch.cat([x, weak, strong])).split([4, 6, 6])
        source = model.teacher(weak) if teacher_targets else logits_w
        expected = fixmatch_loss(logits_x, y, source, logits_s, threshold=0.9, unlabeled_labels=truth)
        results[teacher_targets] = model(x, y, weak, strong, truth)
        for got, want in zip(results[teacher_targets], expected):
            torch.testing.assert_close(got, want)
        assert not model.teacher.training  # the teacher stays in eval mode
    (_, from_student), (_, from_teacher) = results[False], results[True]
    assert from_teacher[3] == 1 and from_teacher[4] == 1  # every pseudo-label kept, all class 3
    assert from_student[3] < 1


def test_lr_schedule_is_fixmatch_cosine():
    assert fixmatch_lr(0, 1000, 0.03) == 0.03
    assert fixmatch_lr(1000, 1000, 0.03) == pytest.approx(0.03 * math.cos(7 * math.pi / 16))
    assert fixmatch_lr(2000, 1000, 0.03) == fixmatch_lr(1000, 1000, 0.03)
    lrs = [fixmatch_lr(k, 1000, 0.03) for k in range(0, 1001, 100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_optimizer_decays_weights_only_with_nesterov():
    model = WideResNet(10, depth=10, widen=1)
    opt = build_optimizer(model, lr=0.03, momentum=0.9, weight_decay=5e-4)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p is model.fc.weight for p in decay["params"])  # conv kernels and the fc weight
    bn = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in [*bn, model.fc.bias]}
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_wide_resnets_are_fixmatchs():
    assert sum(p.numel() for p in wrn_28_2().parameters()) == 1_467_610
    assert sum(p.numel() for p in wrn_28_8().parameters()) == 23_401_012
    net = wrn_28_2()
    assert {m.momentum for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.001}
    assert {m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)} == {0.1}
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ----------------------------------------------------------------------------------------- config


def test_presets_and_cli_choices():
    assert set(PRESETS) == set(cli.PRESET_NAMES)
    c10, c100 = preset("fixmatch-cifar10"), preset("fixmatch-cifar100")
    assert (c10.depth, c10.widen, c10.weight_decay, c10.num_labels) == (28, 2, 5e-4, 4000)
    assert (c100.depth, c100.widen, c100.weight_decay, c100.num_labels) == (28, 8, 1e-3, 10000)
    for c in (c10, c100):
        assert (c.labeled_batch, c.mu, c.threshold, c.lambda_u, c.lr, c.total_steps) == (64, 7, 0.95, 1.0, 0.03, 2**20)
        assert (c.smoothing, c.keep_prob, c.momentum, c.teacher_targets) == ("sts", 0.5, 0.999, False)
        c.validate(world_size=8)
    from fastse.pretrain.config import COMPILE_MODES
    from fastse.smoothing import GRANULARITIES, RULES

    library = {"dataset": cfg.DATASETS, "rule": RULES, "granularity": GRANULARITIES, "buffers": cfg.BUFFER_MODES,
               "monitor": cfg.MONITORS}
    assert {k: tuple(v) for k, v in library.items()} == cli.CHOICES
    from fastse.cli import training

    assert (training.COMPILE_MODES, training.WANDB_MODES) == (COMPILE_MODES, cfg.WANDB_MODES)
    with pytest.raises(ValueError, match="labeled_batch=64 is not divisible by the 3 processes"):
        c10.validate(world_size=3)


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("rule,granularity,buffers", [
    ("ema", "tensor", "copy"), ("se", "channel", "copy"), ("sts", "tensor", "ema"),
])
def test_twenty_steps(tiny_cifar, cache, tmp_path, rule, granularity, buffers):
    out = tmp_path / "run"
    trainer = SemiTrainer(small(tiny_cifar, out, cache, rule=rule, granularity=granularity, buffers=buffers))
    initial = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    result = trainer.fit()
    assert result["step"] == 20 and math.isfinite(result["loss"])
    lines = _lines(out)
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [5, 10, 15, 20]
    assert all(math.isfinite(m["loss"]) and 0 <= m["mask"] <= 1 and m["steps_per_s"] > 0 for m in steps)
    assert [m["lr"] for m in steps] == [fixmatch_lr(k - 1, 20, 0.03) for k in (5, 10, 15, 20)]
    fractions = [m["updated_fraction"] for m in steps]
    assert fractions == [1.0] * 4 if rule == "ema" else all(0 < f < 1 for f in fractions) and len(set(fractions)) > 1
    evals = [m for m in lines if "teacher_acc" in m and "final" not in m]
    assert [m["step"] for m in evals] == [10, 20]
    final = lines[-1]
    assert final["final"] and final["teacher_acc"] == evals[-1]["teacher_acc"] == result["teacher_acc"]
    assert final["teacher_acc_median"] == np.median([m["teacher_acc"] for m in evals])
    assert all(0 <= m[k] <= 100 for m in evals for k in ("teacher_acc", "student_acc"))
    teacher, student = trainer.model.teacher.state_dict(), trainer.model.student.state_dict()
    params = {n for n, _ in trainer.model.teacher.named_parameters()}
    assert any(not torch.equal(teacher[k], initial[k]) for k in params), "the teacher never changed"
    if rule != "se":
        assert any(not torch.equal(teacher[k], student[k]) for k in params), "the teacher is the student"
    running = [k for k in teacher if k.endswith("running_mean")]
    same = [torch.equal(teacher[k], student[k]) for k in running]
    assert all(same) if buffers == "copy" else not any(same)
    assert latest_checkpoint(out).name == "step-000000020"


def test_teacher_targets_switch_routes_weak_views_through_the_teacher(tiny_cifar, cache, tmp_path):
    calls = {}
    for teacher_targets in (False, True):
        trainer = SemiTrainer(small(tiny_cifar, tmp_path / str(teacher_targets), cache, max_steps=3, eval_every=100,
                                    teacher_targets=teacher_targets))
        seen, teacher = [], trainer.model.teacher

        def spy(x, seen=seen, teacher=teacher):
            seen.append(len(x))
            return teacher(x)

        trainer.model.wrap(teacher=spy)
        trainer.fit()
        calls[teacher_targets] = seen
    assert calls[False] == [40]  # the final evaluation only: 40 test images
    assert calls[True] == [16, 16, 16, 40]  # the 16 weak views of each step, then the evaluation


def test_interrupted_and_resumed_run_is_bit_identical(tiny_cifar, cache, tmp_path):
    common = dict(rule="sts", granularity="channel", buffers="ema", teacher_targets=True, threshold=0.3,
                  deterministic=True)
    train(small(tiny_cifar, tmp_path / "a", cache, **common))
    stopped = train(small(tiny_cifar, tmp_path / "b", cache, max_steps=9, **common))  # mid-epoch of both streams
    assert stopped["step"] == 9 and latest_checkpoint(tmp_path / "b").name == "step-000000009"
    resumed = train(small(tiny_cifar, tmp_path / "b", cache, **common), resume=True)
    (ga, ma), (gb, mb) = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in "ab")
    assert ma["step"] == mb["step"] == 20 and ma["smoother"] == mb["smoother"]
    for group in ("student", "teacher", "optimizer"):
        assert ga[group].keys() == gb[group].keys()
        different = [k for k in ga[group] if not torch.equal(ga[group][k], gb[group][k])]
        assert not different, f"{group}: {different[:3]}"
    lines_a, lines_b = (_lines(tmp_path / r) for r in "ab")
    losses_a, losses_b = ({m["step"]: m for m in lines if "loss" in m} for lines in (lines_a, lines_b))
    assert losses_a[15] == {**losses_b[15], "steps_per_s": losses_a[15]["steps_per_s"],
                            "img_per_s": losses_a[15]["img_per_s"], "eta_s": losses_a[15]["eta_s"],
                            "wall_s": losses_a[15]["wall_s"]}  # all but the timings equal
    assert resumed["teacher_acc"] == lines_a[-1]["teacher_acc"] and resumed["student_acc"] == lines_a[-1]["student_acc"]
    assert [e["step"] for e in mb["evals"]] == [9, 10, 20]  # the stop at 9 evaluated too


def test_views_preview_is_the_first_unlabeled_batch(tiny_cifar, cache, tmp_path):
    from fastse.pipelines.datasets import SPLIT_FILE

    from fastse.engine import launch as ddp
    from fastse.engine.preview import read_png, view_grid
    from fastse.semi.data import build_data

    out = tmp_path / "run"
    train(small(tiny_cifar, out, cache, max_steps=2, eval_every=100))
    picture = read_png(out / "views.png")
    # the same seed and split: the same batches
    data = build_data(small(tiny_cifar, out, cache), ddp.launch_env("cpu"), torch.float32,
                      saved_split=out / SPLIT_FILE)
    _, _, weak, strong, _ = next(data.batches(0))
    recipe = data.unlabeled.recipe
    expected = view_grid((weak, strong), recipe.mean, recipe.std)
    assert picture.shape == expected.shape == (2 * 96 + 2, 8 * 96 + 7 * 2, 3)  # weak and strong x 8 images, 32 px x 3
    assert np.array_equal(picture, expected)
    assert picture.std() > 20 and not np.array_equal(picture[:96], picture[98:])  # two different views, not blank
    top_left = picture[:96:3, :96:3].astype(np.float32) / 255  # denormalised: one pixel per block of the weak view
    again = (top_left - np.array(recipe.mean)) / np.array(recipe.std)
    assert np.allclose(again.transpose(2, 0, 1), weak[0].numpy(), atol=1 / 255 / min(recipe.std) + 1e-5)


def _best_eval(evals: list[dict], metric: str) -> dict:
    return max(evals, key=lambda e: (e[metric], -e["step"]))  # the first of equals


@pytest.mark.parametrize("monitor", ["teacher_acc", "student_acc"])
def test_best_holds_the_best_evaluation_and_survives_resume(tiny_cifar, cache, tmp_path, monitor):
    from fastse import checkpoints as ckpt

    out = tmp_path / "run"
    common = dict(eval_every=4, ckpt_every=4, keep_ckpts=10, monitor=monitor, threshold=0.3)
    train(small(tiny_cifar, out, cache, max_steps=12, **common))
    path, meta = ckpt.best_checkpoint(out)
    first = _best_eval(meta["evals"], monitor)  # the evaluations up to the best one
    evals = [m for m in _lines(out) if monitor in m and "final" not in m]
    best = _best_eval(evals, monitor)
    assert meta["best"] == {"metric": monitor, "value": best[monitor], "step": best["step"]}
    assert meta["step"] == best["step"]
    assert first["step"] == best["step"]
    assert [m["step"] for m in _lines(out) if f"best_{monitor}" in m][-1] == best["step"]
    saved = load_checkpoint(out / "checkpoints" / f"step-{best['step']:09d}")[0]  # the same step's state
    groups = load_checkpoint(path)[0]
    for group in ("student", "teacher"):
        assert all(torch.equal(v, saved[group][k]) for k, v in groups[group].items())
    picture = (out / "views.png").read_bytes()

    trainer = SemiTrainer(small(tiny_cifar, out, cache, **common), resume=True)
    assert trainer.best_value == best[monitor]
    trainer.fit()
    evals = [m for m in _lines(out) if monitor in m and "final" not in m]
    assert [m["step"] for m in evals] == [4, 8, 12, 16, 20]
    best = _best_eval(evals, monitor)
    _, meta = ckpt.best_checkpoint(out)
    assert (meta["best"]["value"], meta["step"]) == (best[monitor], best["step"])  # over both attempts
    assert (out / "views.png").read_bytes() == picture  # kept: a resumed run does not redraw it
    assert not (out / "checkpoints" / "best").exists()


def test_monitor_none_keeps_no_best(tiny_cifar, cache, tmp_path):
    out = tmp_path / "run"
    train(small(tiny_cifar, out, cache, max_steps=5, eval_every=5, monitor="none"))
    assert not (out / "best").exists() and (out / "views.png").is_file()
    with pytest.raises(ValueError, match="monitor='knn_top1' is not one of teacher_acc, student_acc, none"):
        small(tiny_cifar, out, cache, monitor="knn_top1").validate()


def test_labeled_split_is_balanced_saved_and_reused(tiny_cifar, cache, tmp_path):
    out = tmp_path / "run"
    train(small(tiny_cifar, out, cache, num_labels=30, max_steps=2))
    index = scan_image_folder(tiny_cifar, split="train")
    split = load_split(out, index.files)  # also checks that each index names the file it named
    assert len(split) == 30 and len(set(split.tolist())) == 30
    assert np.bincount(index.labels[split], minlength=10).tolist() == [3] * 10
    assert np.array_equal(split, choose_labeled(index, small(tiny_cifar, out, cache, num_labels=30)))
    other = choose_labeled(index, small(tiny_cifar, out, cache, num_labels=30, split_seed=1))
    assert not np.array_equal(split, other)
    # a resumed run trains on its saved split (another split seed is refused: tests/test_silent_errors.py)
    trainer = SemiTrainer(small(tiny_cifar, out, cache, num_labels=30, max_steps=3, split_seed=0), resume=True)
    assert np.array_equal(trainer.data.split, split)
    trainer.close()
    with pytest.raises(CheckpointError, match="holds a run with num_labels=30, this one has num_labels=20"):
        SemiTrainer(small(tiny_cifar, out, cache, num_labels=20, max_steps=3), resume=True)


def test_labels_must_fit_every_class_and_the_set(tmp_path):
    files = [tmp_path / f"{i}.jpg" for i in range(30)]
    index = ImageFolderIndex(tmp_path, ["cat", "dog"], files, np.array([0] * 5 + [1] * 25))
    config = SemiConfig(num_labels=12, dataset="cifar10")
    with pytest.raises(DataError, match="num_labels=12 takes 6 images of each class, but class 'cat' of .* has 5"):
        choose_labeled(index, config)
    with pytest.raises(DataError, match="num_labels=32 is more than the 30 training images"):
        choose_labeled(index, config.replace(num_labels=32))
    assert np.bincount(index.labels[choose_labeled(index, config.replace(num_labels=10))]).tolist() == [5, 5]


def test_nonfinite_loss_stops_naming_the_step_before_any_checkpoint(tiny_cifar, cache, tmp_path):
    trainer = SemiTrainer(small(tiny_cifar, tmp_path / "run", cache, log_every=100, ckpt_every=5))
    real = trainer.model.forward

    def poisoned(*batch):
        loss, stats = real(*batch)
        return (loss * float("nan"), stats * float("nan")) if trainer.step == 3 else (loss, stats)

    trainer.model.forward = poisoned
    with pytest.raises(TrainingError, match="at step 5"):  # the checkpoint step reads the loss first
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, config: SemiConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = SemiTrainer(config)
    result = trainer.fit()
    torch.save({"teacher": trainer.model.teacher.state_dict(), "student": trainer.model.student.state_dict(),
                "result": result, "batch": next(trainer.data.batches(0))},
               Path(config.out) / f"rank{rank}.pt")


def test_two_process_gloo_ddp_keeps_identical_teachers(tiny_cifar, cache, tmp_path):
    config = small(tiny_cifar, tmp_path / "run", cache, max_steps=6, eval_every=3, log_every=3, teacher_targets=True)
    mp.spawn(_ddp_rank, args=(2, _free_port(), config), nprocs=2)
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1))
    for part in ("teacher", "student"):
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    assert len(r0["batch"][0]) == 4 and len(r0["batch"][2]) == 8  # half of each batch per rank
    assert not torch.equal(r0["batch"][2], r1["batch"][2])  # shards of different images
    for key in ("teacher_acc", "student_acc", "teacher_acc_median"):
        assert r0["result"][key] == r1["result"][key]
    groups, meta = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert meta["world_size"] == 2 and meta["step"] == 6 and [e["step"] for e in meta["evals"]] == [3, 6]
    lines = _lines(tmp_path / "run")
    assert [len(m["teacher_checksum"]) for m in lines if "loss" in m] == [2, 2]  # at every metrics line
    assert [m["step"] for m in lines if m.get("teacher_bit_identical")] == [6] and lines[-1]["final"]
    assert all(torch.equal(groups["teacher"][k], r0["teacher"][k]) for k in r0["teacher"])


# ---------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("args,message", [
    (["--num-labels", "25"], "--num-labels=25 must be a multiple of the 10 classes"),
    (["--num-labels", "200"], "--num-labels=200 is more than the 100 training images of"),
    (["--keep-prob", "1.5"], "--keep-prob=1.5 is outside [0, 1]"),
    (["--threshold", "2"], "--threshold=2.0 is outside [0, 1]"),
    (["--mu", "0"], "--mu=0 must be >= 1"),
    (["--depth", "12"], "--depth=12: a Wide ResNet is 6n+4 layers deep"),
    (["--labeled-batch", "64"], "--labeled-batch=64 x --mu=2 unlabeled images a step, but"),
    (["--smoothing", "swa"], "Invalid value for '--rule' / '--smoothing'"),
    (["--buffers", "keep"], "Invalid value for '--buffers'"),
])
def test_bad_flags_exit_2_with_one_clear_line(tiny_cifar, cache, tmp_path, args, message):
    base = ["semi", "--data", str(tiny_cifar), "--num-labels", "20", "--depth", "10", "--widen", "1",
            "--labeled-batch", "8", "--mu", "2", "--device", "cpu", "--out", str(tmp_path / "run"), "--wandb",
            "disabled", "--cache-dir", str(cache)]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_data_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["semi", "--data", "/no/such/folder", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "/no/such/folder: no such folder or archive" in result.output


def test_a_tiny_run_reports_and_resumes(tiny_cifar, cache, tmp_path):
    out = tmp_path / "run"

    def run(*extra: str):
        return CliRunner().invoke(main, [
            "semi", "--preset", "fixmatch-cifar10", "--data", str(tiny_cifar), "--num-labels", "20", "--depth", "10",
            "--widen", "1", "--labeled-batch", "8", "--mu", "2", "--total-steps", "6", "--eval-every", "2",
            "--log-every", "2", "--out", str(out), "--wandb", "disabled", "--cache-dir", str(cache), "--no-compile",
            "--device", "cpu", "--teacher-targets", *extra])

    result = run("--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert "step 4/4" in result.output and "final at step 4: teacher (sts) top-1" in result.output
    assert (out / "labeled_split.json").is_file() and (out / "checkpoints" / "step-000000004").is_dir()
    again = run()
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = run("--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at step 4" in resumed.output and "median of the last 3 evaluations" in resumed.output
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["compiled"] is False


def test_sigusr1_and_time_limit_stop_with_a_checkpoint_and_resume_continues(tiny_cifar, cache, tmp_path):
    """A stop signal (SLURM's --signal=USR1) or --time-limit ends the run at the next log line: its checkpoint
    written, no final report, exit 3 from the CLI; --resume then finishes bit-identically."""
    common = dict(deterministic=True, log_every=3, ckpt_every=100)
    train(small(tiny_cifar, tmp_path / "a", cache, **common))
    trainer = SemiTrainer(small(tiny_cifar, tmp_path / "b", cache, **common))
    step = trainer.train_step
    trainer.train_step = lambda batch: (trainer.step == 4 and os.kill(os.getpid(), signal.SIGUSR1)) or step(batch)
    stopped = trainer.fit()
    assert stopped["stopped"] == "SIGUSR1" and stopped["step"] == 6 and "teacher_acc_median" not in stopped
    assert latest_checkpoint(tmp_path / "b").name == "step-000000006"
    resumed = train(small(tiny_cifar, tmp_path / "b", cache, **common), resume=True)
    assert resumed["step"] == 20 and "stopped" not in resumed
    (ga, _), (gb, _) = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in "ab")
    for group in ("student", "teacher", "optimizer"):
        assert all(torch.equal(ga[group][k], gb[group][k]) for k in ga[group]), group

    out = tmp_path / "cli"
    args = ["semi", "--data", str(tiny_cifar), "--dataset", "cifar10", "--num-labels", "20", "--depth", "10",
            "--widen", "1", "--labeled-batch", "8", "--mu", "2", "--total-steps", "6", "--log-every", "2",
            "--out", str(out), "--wandb", "disabled", "--cache-dir", str(cache), "--no-compile", "--device", "cpu"]
    limited = CliRunner().invoke(main, [*args, "--time-limit", "1e-6"])
    assert limited.exit_code == 3 and "stopped at step 2 of 6 (the time limit of 1e-06 min)" in limited.output
    assert CliRunner().invoke(main, [*args, "--resume"]).exit_code == 0
