"""`fastse report` and `benchmarks/study.py`: real tiny runs (pretraining, FixMatch) read as their writers
wrote them, run.json, multi-seed groups (written by the real writers) with mean ± std and the EMA
comparison, plots, errors, and a study of two tiny pretraining runs on real CIFAR-10 JPEGs that is
stopped (SIGTERM, then its time budget) and resumed to the end."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastse.cli.main import main
from PIL import Image

from fastse.engine.logging import RunLog
from fastse.pretrain.config import preset
from fastse.report import ReportError, build_tables, load_run, markdown, write_report
from fastse.results import add_result
from fastse.semi.config import preset as semi_preset

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks" / "study.py"
COMMIT = "0123456789abcdef"


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def semi_run(tiny_cifar, tmp_path_factory) -> Path:
    """A finished 20-step FixMatch run (WRN-10-1, CPU) evaluated every 5 steps."""
    from fastse.semi.config import SemiConfig
    from fastse.semi.trainer import train

    out = tmp_path_factory.mktemp("semi") / "run"
    train(SemiConfig(data=str(tiny_cifar), dataset="cifar10", num_labels=20, depth=10, widen=1, labeled_batch=8,
                     mu=2, total_steps=20, eval_every=5, log_every=5, ckpt_every=20, out=str(out), wandb="disabled",
                     device="cpu", compile=False, cache_dir=str(out.parent / "cache")))
    return out


def test_real_runs_are_read_as_their_writers_wrote_them(tiny_run, semi_run):
    run = load_run(tiny_run)  # 4 steps of a 5-step epoch (max_steps), kNN only at the end
    knn = [m for m in _lines(tiny_run) if "knn_top1" in m]
    assert run.kind == "pretrain" and run.method == "byol" and run.config["max_steps"] == 4
    assert run.finished and run.progress == (0.8, 0.8)
    assert run.values() == {"knn_top1": knn[-1]["knn_top1"], "probe_top1": knn[-1]["probe_top1"]}  # online probe
    assert run.curve() == ([0.8], [knn[-1]["knn_top1"]])
    start = run.starts[0]
    assert start["device"] == "cpu" and start["argv"] == sys.argv and start["torch"]

    semi = load_run(semi_run)
    final = _lines(semi_run)[-1]
    assert final["final"] and semi.kind == "semi" and semi.method == "fixmatch" and semi.finished
    assert semi.values() == {"teacher_median": final["teacher_acc_median"], "teacher_last": final["teacher_acc"],
                             "student_median": final["student_acc_median"], "student_last": final["student_acc"]}
    assert semi.curve()[0] == [5.0, 10.0, 15.0, 20.0] and semi.progress == (20, 20)


def test_run_json_records_every_start(tmp_path, monkeypatch):
    config = {"method": "byol", "device": "cpu", "epochs": 1}
    monkeypatch.setenv("FASTSE_COMMIT", COMMIT)
    RunLog(tmp_path, config, wandb="disabled").close()
    monkeypatch.delenv("FASTSE_COMMIT")
    RunLog(tmp_path, {**config, "epochs": 2}, wandb="disabled").close()  # resumed with another setting
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["config"]["epochs"] == 2 and [s["device"] for s in info["starts"]] == ["cpu", "cpu"]
    assert info["starts"][0]["commit"] == COMMIT
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    if (REPO / ".git").exists():  # a checkout (CI clones one): HEAD, marked when tracked files changed
        assert info["starts"][1]["commit"] in (head, head + "-dirty")
    else:
        assert info["starts"][1]["commit"] is None
    assert not list(tmp_path.glob(".run.json*"))  # no temp file left


# ------------------------------------------------------------------------------- synthetic runs


def pretrain_run(folder: Path, method: str, knn: list[float], *, evals: dict | None = None, epochs: int = 4,
                 **changes) -> Path:
    """A run folder written by the real writers (RunLog, add_result) as the trainer writes it: a
    loss line and a kNN line at the end of every epoch of 10 steps, kNN top-1 `knn` by epoch."""
    config = preset(f"{method}-cifar10", epochs=epochs, knn_every=1, device="cpu", out=str(folder), **changes)
    log = RunLog(folder, config.to_dict(), wandb="disabled")
    for epoch, acc in enumerate(knn, 1):
        log.log({"step": 10 * epoch, "epoch": float(epoch), "loss": 1.0 / epoch, "lr": 0.06, "momentum": 0.99,
                 "img_per_s": 9000.0})
        log.log({"step": 10 * epoch, "epoch": float(epoch), "knn_top1": acc, "knn_top5": 99.0, "knn_s": 0.4})
    log.close()
    for key, top1 in (evals or {}).items():
        add_result(folder, key, {"top1": top1, "top5": 99.5, "protocol": key, "seconds": 2.0})
    return folder


def semi_run_dir(folder: Path, base: float, **changes) -> Path:
    """A finished FixMatch run: 30 evaluations every 100 steps, teacher top-1 base+1 ... base+30."""
    config = semi_preset("fixmatch-cifar10", num_labels=40, total_steps=3000, eval_every=100, device="cpu",
                         out=str(folder), **changes)
    log = RunLog(folder, config.to_dict(), wandb="disabled")
    for i in range(1, 31):
        log.log({"step": 100 * i, "loss": 1.0, "mask": 0.5, "lr": 0.03})
        log.log({"step": 100 * i, "teacher_acc": base + i, "student_acc": base + i - 5, "eval_s": 0.2})
    log.log({"step": 3000, "teacher_acc": base + 30, "student_acc": base + 25, "teacher_acc_median": base + 20.5,
             "student_acc_median": base + 15.5, "evaluations": 20, "final": True})
    log.close()
    return folder


@pytest.fixture()
def study_runs(tmp_path, monkeypatch) -> list[Path]:
    """BYOL: EMA and STS (3 seeds each), SE and STS element (1 seed); MoCo: EMA, and STS stopped halfway;
    FixMatch: EMA and STS, 2 seeds each. All on 'GPU' cpu at commit COMMIT."""
    monkeypatch.setenv("FASTSE_COMMIT", COMMIT)
    r = tmp_path / "runs"
    runs = []
    for seed, (final, fast) in enumerate([(70.0, 80.0), (71.0, 82.0), (72.0, None)]):
        runs.append(pretrain_run(r / f"byol-ema-s{seed}", "byol", [50, 60, 65, final], smoothing="ema", seed=seed,
                                 evals={"fast": fast} if fast else {}))
    for seed, final in enumerate([73.0, 74.0, 75.0]):
        runs.append(pretrain_run(r / f"byol-sts-s{seed}", "byol", [52, 62, 67, final], smoothing="sts",
                                 keep_prob=0.7, granularity="tensor", seed=seed, evals={"fast": final + 10}))
    runs.append(pretrain_run(r / "byol-se-s0", "byol", [40, 50, 55, 60.0], smoothing="se", evals={"fast": 70.0}))
    runs.append(pretrain_run(r / "byol-sts-element-s0", "byol", [50, 60, 65, 71.5], smoothing="sts",
                             granularity="element", evals={"fast": 81.0, "knn": 71.0}))
    runs.append(pretrain_run(r / "mocov2-ema-s0", "mocov2", [40, 45, 48, 50.0], smoothing="ema"))
    runs.append(pretrain_run(r / "mocov2-sts-s0", "mocov2", [41, 46], smoothing="sts"))  # 2 of 4 epochs
    for seed in (0, 1):
        runs.append(semi_run_dir(r / f"fixmatch-ema-s{seed}", 40.0 + seed, smoothing="ema", seed=seed))
        runs.append(semi_run_dir(r / f"fixmatch-sts-s{seed}", 50.0 + 2 * seed, smoothing="sts", seed=seed))
    # a resumed run rewrote the steps since its checkpoint: the later lines count; a line cut short is skipped
    with open(runs[1] / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "epoch": 2.0, "knn_to\n')
        f.write(json.dumps({"step": 20, "epoch": 2.0, "knn_top1": 64.0, "knn_top5": 99.0, "knn_s": 0.4}) + "\n")
    return runs


def test_seeds_form_groups_with_mean_std_and_the_ema_comparison(study_runs):
    tables = build_tables([load_run(p) for p in study_runs])
    assert [(t.kind, t.method) for t in tables] == [("pretrain", "byol"), ("pretrain", "mocov2"), ("semi", "fixmatch")]
    byol, moco, fixmatch = tables
    assert [g.label for g in byol.groups] == ["ema", "sts p=0.7 tensor", "se p=0.7 tensor", "sts p=0.7 element"]
    assert [[r.seed for r in g.runs] for g in byol.groups] == [[0, 1, 2], [0, 1, 2], [0], [0]]
    ema, sts = byol.groups[:2]
    assert ema.stat("knn_top1") == (71.0, 1.0, 3) and ema.stat("eval:fast") == (81.0, pytest.approx(2**0.5), 2)
    assert byol.baseline(sts) is ema and byol.baseline(ema) is None
    xs, mean, low, high = ema.curve()
    assert xs == [1.0, 2.0, 3.0, 4.0] and mean[1] == pytest.approx((60 + 64 + 60) / 3) and (low[1], high[1]) == (60, 64)
    assert load_run(study_runs[1]).unreadable == 1
    assert [g.label for g in fixmatch.groups] == ["ema", "sts p=0.5 tensor"]
    assert fixmatch.groups[1].stat("teacher_median") == (71.5, pytest.approx(2**0.5), 2)  # 50+20.5, 52+20.5

    md = markdown(tables, "STS vs EMA").splitlines()
    assert md[0] == "# STS vs EMA"
    header = ("| run | seeds | epochs | kNN top-1 % | kNN top-1: vs EMA | paper | agrees | linear fast top-1 % | "
              "kNN top-1 (fastse knn) % | GPU | commit |")
    assert header in md
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| run |")]
    assert rows == [
        "| ema | 0, 1, 2 | 4 | 71.00 ± 1.00 | – | – | – | 81.00 ± 1.41 (2 of 3 runs) | – | cpu | 0123456789 |",
        "| sts p=0.7 tensor | 0, 1, 2 | 4 | 74.00 ± 1.00 | +3.00 ± 0.82 (beyond the noise) | above EMA (+0.9 ImageNet "
        "linear) | yes | 84.00 ± 1.00 | – | cpu | 0123456789 |",
        # one seed: the EMA seeds' std stands in for its own, sqrt(1/1 + 1/3)
        "| se p=0.7 tensor | 0 | 4 | 60.00 | -11.00 ± 1.15 (beyond the noise; EMA seeds spread) | level with EMA | "
        "no: below | 70.00 | – | cpu | 0123456789 |",
        "| sts p=0.7 element | 0 | 4 | 71.50 | +0.50 ± 1.15 (inside the noise; EMA seeds spread) | above EMA (+0.9 "
        "ImageNet linear) | no: inside the noise | 81.00 | 71.00 | cpu | 0123456789 |",
        "| ema | 0 | 4 | 50.00 | – | – | – | cpu | 0123456789 |",
        "| sts p=0.5 tensor | 0 | 2 of 4 | 46.00 | -4.00 (one seed: noise unknown) | above EMA | "
        "cannot tell (one seed) | cpu | 0123456789 |",
        "| ema | 0, 1 | 3000 | 61.00 ± 0.71 | – | – | – | 70.50 ± 0.71 | 56.00 ± 0.71 | cpu | 0123456789 |",
        "| sts p=0.5 tensor | 0, 1 | 3000 | 71.50 ± 1.41 | +10.50 ± 1.12 (beyond the noise) | above EMA (~+6, few "
        "labels) | yes | 81.00 ± 1.41 | 66.50 ± 1.41 | cpu | 0123456789 |",
    ]
    assert any("mocov2-sts-s0` (sts p=0.5 tensor, seed 0): kNN top-1 46.00; 2 of 4 epochs" in line for line in md)
    assert "Shared settings: arch=resnet18, dataset=cifar10, epochs=4, batch_size=512" in "\n".join(md)
    assert "Shared settings: dataset=cifar10, depth=28, widen=2, num_labels=40, total_steps=3000" in "\n".join(md)


def test_noise_verdict_and_labels_of_other_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSE_COMMIT", COMMIT)
    runs = [pretrain_run(tmp_path / f"ema-{s}", "byol", [70.0 + s], smoothing="ema", seed=s, epochs=1) for s in (0, 1)]
    runs += [pretrain_run(tmp_path / f"sts-{s}", "byol", [70.5 + 2 * s], smoothing="sts", seed=s, epochs=1)
             for s in (0, 1)]
    runs += [pretrain_run(tmp_path / "lr", "byol", [60.0], smoothing="sts", lr=0.06, epochs=1)]
    (table,) = build_tables([load_run(p) for p in runs])
    assert [g.label for g in table.groups] == ["ema lr=0.03", "sts p=0.7 tensor lr=0.03", "sts p=0.7 tensor lr=0.06"]
    text = markdown([table], "t")
    assert "| +1.00 ± 1.12 (inside the noise) |" in text  # 71.5 - 70.5, sqrt(0.5/2 + 2/2)
    assert table.baseline(table.groups[2]) is None  # no EMA run at lr 0.06


def test_report_writes_markdown_and_plots(study_runs, tmp_path):
    path, text = write_report(study_runs, tmp_path / "out", title="Study")
    assert path.read_text() == text + "\n"
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == ["pretrain-byol.png", "pretrain-mocov2.png", "semi-fixmatch.png"]
    for name in pngs:
        assert f"]({name})" in text
        with Image.open(tmp_path / "out" / name) as im:
            im.verify()
        with Image.open(tmp_path / "out" / name) as im:
            # accuracy above, the teacher's momentum / updated fraction / distance panels below where the records
            # hold them (this study's semi records do not)
            height = 504 if name.startswith("semi") else 792
            assert im.size == (840, height) and len(im.convert("RGB").getcolors(1 << 20)) > 50  # lines, bands, text


def test_cli_report_and_its_errors(study_runs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(main, ["report", *map(str, study_runs[:3]), "--out", str(out), "--title", "Three"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# Three\n") and "| ema | 0, 1, 2 | 4 | 71.00 ± 1.00 |" in result.stdout
    assert (out / "report.md").is_file() and (out / "pretrain-byol.png").stat().st_size > 0

    (tmp_path / "empty").mkdir()
    evaluation = tmp_path / "eval-run"
    RunLog(evaluation, {"protocol": "fast", "device": "cpu", "eval": "linear-fast"}, wandb="disabled").close()
    cases = [([str(tmp_path / "missing")], "missing: no such folder"),
             ([str(tmp_path / "empty")], "empty: not a run folder (no metrics.jsonl"),
             ([str(evaluation)], "not a pretraining or FixMatch run (its run.json is of 'linear-fast')"),
             ([str(study_runs[0]), str(study_runs[0])], "byol-ema-s0: given twice")]
    for args, message in cases:
        result = runner.invoke(main, ["report", *args, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "bad").exists()  # nothing written before the runs are read
    with pytest.raises(ReportError, match="no run folders"):
        write_report([], tmp_path / "none")


def test_runs_before_run_json_take_the_config_of_their_checkpoint(tiny_run, tmp_path):
    old = tmp_path / "old"
    for meta in tiny_run.glob("checkpoints/step-*/meta.json"):  # the metrics and the checkpoints' metadata
        (old / meta.parent.relative_to(tiny_run)).mkdir(parents=True)
        (old / meta.relative_to(tiny_run)).write_bytes(meta.read_bytes())
    (old / "metrics.jsonl").write_bytes((tiny_run / "metrics.jsonl").read_bytes())
    run = load_run(old)
    assert run.config == load_run(tiny_run).config and run.starts == [] and run.finished
    text = markdown(build_tables([run]), "t")
    assert "| sts p=0.7 tensor | 0 | 0.80 | " in text and "| not recorded | not recorded |" in text


def test_help_imports_neither_matplotlib_nor_torch():
    code = ("import sys; from click.testing import CliRunner; from fastse.cli.main import main; import fastse.report\n"
            "r = CliRunner().invoke(main, ['report', '--help']); assert r.exit_code == 0, r.output\n"
            "assert 'RUN_DIR...' in r.output\n"
            "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout


# ---------------------------------------------------------------------------------------- study


def _study():
    """benchmarks/study.py as a module."""
    if "study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("study", STUDY)
        sys.modules["study"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["study"])
    return sys.modules["study"]


@pytest.mark.parametrize("entry,message", [
    ({"name": "a", "command": "train"}, "command='train' is not one of pretrain, semi, eval-linear"),
    ({"name": "a", "command": "pretrain", "arg": {}}, "unknown key(s) arg"),
    ({"name": "a", "command": "pretrain", "args": {"smoothing": "bogus"}}, "fastse pretrain refuses its flags"),
    ({"name": "a", "command": "pretrain", "args": {"nope": 1}}, "No such option '--nope'"),
    ({"name": "a", "command": "pretrain", "args": {"seed": 1}}, "seed is set by the study"),
    ({"name": "a", "command": "pretrain", "seeds": [0, -1]}, "seeds=[0, -1] must be a list of integers >= 0"),
    ({"name": "a", "command": "eval-linear", "of": "b"}, "of='b' must name pretrain runs listed before it"),
    ({"name": "a/b", "command": "pretrain"}, "each run needs a name of its own"),
])
def test_study_spec_errors_name_the_entry(tmp_path, entry, message):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"data": "cifar10", "run": [entry]}))
    study = _study()
    with pytest.raises(study.SpecError, match="run a.*" + re.escape(message)):
        study.load_spec(spec)


def test_study_expands_seeds_and_evaluates_right_after_each_run(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('out = "o"\n[defaults.pretrain]\nwandb = "disabled"\n[defaults.eval-linear]\nwandb = "disabled"\n'
                    '[[run]]\nname = "a"\ncommand = "pretrain"\npreset = "byol-cifar10"\nseeds = [3, 4]\n'
                    'args = { smoothing = "ema", compile = false }\n'
                    '[[run]]\nname = "b"\ncommand = "semi"\n'
                    '[[run]]\nname = "lin"\ncommand = "eval-linear"\nof = "a"\nargs = { protocol = "fast" }\n')
    out, jobs = _study().load_spec(spec, data="/data")
    assert out == Path("o") and [j.name for j in jobs] == ["a-s3", "a-s3.lin", "a-s4", "a-s4.lin", "b-s0"]
    assert jobs[0].argv == ["pretrain", "--preset", "byol-cifar10", "--seed", "3", "--out", "o/a-s3", "--resume",
                            "--wandb", "disabled", "--smoothing", "ema", "--no-compile", "--data", "/data"]
    assert jobs[1].argv == ["eval-linear", "--checkpoint", "o/a-s3", "--seed", "3", "--wandb", "disabled",
                            "--protocol", "fast", "--data", "/data"]
    assert jobs[1].after is jobs[0] and jobs[1].protocol == "fast" and jobs[4].folder == Path("o/b-s0")


class FakeProc:
    """A job's process that ends (with `rc`) at its second poll."""

    def __init__(self, job, finished: set, rc: int):
        self.job, self.finished, self.rc, self.polls, self.returncode = job, finished, rc, 0, None

    def poll(self):
        self.polls += 1
        if self.polls >= 2:
            self.returncode = self.rc
            self.finished.update([self.job.name] if self.rc == 0 else [])
        return self.returncode


def _fake_processes(monkeypatch, study, start, finished: set) -> None:
    """study.py with `start` in place of starting processes; a job is done once its name is in `finished`."""
    monkeypatch.setattr(study, "start", start)
    monkeypatch.setattr(study.Job, "done", lambda self: self.name in finished)
    monkeypatch.setattr(study, "load_run", lambda folder: type("R", (), {"values": lambda self: {}})())


def test_study_queue_runs_one_job_per_gpu_and_evaluates_after_the_run(tmp_path, monkeypatch):
    study = _study()
    a = study.Job("a-s0", "pretrain", tmp_path / "a", ["pretrain"], 0)
    jobs = [a, study.Job("a-s0.lin", "eval-linear", tmp_path / "a", ["eval-linear"], 0, a, "fast"),
            study.Job("b-s0", "pretrain", tmp_path / "b", ["pretrain"], 0),
            study.Job("c-s0", "pretrain", tmp_path / "c", ["pretrain"], 0)]
    finished, started, rc = {"c-s0"}, [], {"b-s0": 1}  # c is done already; b fails

    def start(job, gpu, logs):
        started.append((job.name, gpu))
        (logs / f"{job.name}.log").write_text("Traceback: boom\n")
        return FakeProc(job, finished, rc.get(job.name, 0))

    _fake_processes(monkeypatch, study, start, finished)
    handler = signal.getsignal(signal.SIGTERM)
    assert study.run_jobs(jobs, gpus=["0", "1"], budget=None, logs=tmp_path) == study.FAILED
    assert started == [("a-s0", "0"), ("b-s0", "1"), ("a-s0.lin", "0")]  # the eval waits for its run
    assert finished == {"a-s0", "a-s0.lin", "c-s0"}
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_study_starts_a_job_on_its_gpu_in_a_process_group_of_its_own(tmp_path, monkeypatch):
    study = _study()
    seen = {}
    monkeypatch.setattr(study.subprocess, "Popen", lambda argv, **kw: seen.update(argv=argv, **kw))
    job = study.Job("a-s0", "pretrain", tmp_path / "a", ["pretrain", "--seed", "0"], 0)
    study.start(job, "3", tmp_path)
    assert seen["argv"] == [sys.executable, "-P", "-m", "fastse.cli.main", "pretrain", "--seed", "0"]
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3" and seen["process_group"] == 0
    assert str(REPO) not in seen["env"].get("PYTHONPATH", "")  # -P: the installed fastse, not the checkout's
    assert "CUDA_VISIBLE_DEVICES=3: " in (tmp_path / "a-s0.log").read_text()


def test_study_runs_stops_resumes_and_reports(tiny_cifar, tmp_path):
    """Two tiny BYOL runs and a fast linear eval of the first: stopped by SIGTERM once the second has
    its first checkpoint, then by a 2 s time budget, then resumed to the end."""
    out, cache = tmp_path / "study", tmp_path / "cache"
    spec = tmp_path / "tiny.toml"
    spec.write_text(f"""
out = "{out}"
data = "{tiny_cifar}"
[defaults.pretrain]
wandb = "disabled"
device = "cpu"
compile = false
image-size = 8
batch-size = 8
limit = 32
log-every = 2
knn-every = 0
cache-dir = "{cache}"
[[run]]
name = "a"
command = "pretrain"
preset = "byol-cifar10"
args = {{ epochs = 1, smoothing = "ema" }}
[[run]]
name = "lin"
command = "eval-linear"
of = "a"
args = {{ protocol = "fast", epochs = 2, batch-size = 16, device = "cpu", wandb = "disabled", cache-dir = "{cache}" }}
[[run]]
name = "b"
command = "pretrain"
preset = "byol-cifar10"
args = {{ epochs = 3, ckpt-every = 1 }}
""")
    study = lambda *a: [sys.executable, str(STUDY), str(spec), *a]
    a, b = out / "a-s0", out / "b-s0"

    proc = subprocess.Popen(study(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not (b / "checkpoints" / "step-000000004").is_dir():  # b's first epoch (4 steps) is saved
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3, output
    assert "done a-s0 in" in output and "done a-s0.lin in" in output and "stopping at SIGTERM: killing b-s0" in output
    assert load_run(a).finished and "fast" in load_run(a).evals and not load_run(b).finished

    with open(out / ".study.lock", "w") as lock:  # a second study.py on the same folder is refused
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = subprocess.run(study(), capture_output=True, text=True)
    assert busy.returncode == 2 and "another study.py is running on" in busy.stderr

    budget = subprocess.run(study("--time-budget", "2"), capture_output=True, text=True, timeout=120)
    assert budget.returncode == 3, budget.stdout + budget.stderr
    assert "2 of 3 jobs done; 1 to run" in budget.stdout and "stopping at the time budget of 2 s: killing b-s0" in (
        budget.stdout)

    final = subprocess.run(study(), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stdout + final.stderr
    resumed = int(final.stdout.split("start b-s0 (resumes at step ")[1].split(")")[0])
    assert resumed >= 4 and f"resumed at step {resumed}" in (out / "logs" / "b-s0.log").read_text()
    assert "start a-s0" not in final.stdout and "3 of 3 jobs done" in final.stdout
    assert load_run(b).finished and [m["step"] for m in _lines(b) if "knn_top1" in m] == [12]
    report = (out / "report" / "report.md").read_text()
    assert "| ema epochs=1 | 0 | 1 |" in report and "| sts p=0.7 tensor epochs=3 | 0 | 3 |" in report
    assert (out / "report" / "pretrain-byol.png").stat().st_size > 0
    assert len(json.loads((b / "run.json").read_text())["starts"]) >= 2


def test_study_runs_several_jobs_per_gpu_spread_over_the_gpus_first(tmp_path, monkeypatch):
    study = _study()
    assert study.job_slots("0,1", 2) == ["0", "1", "0", "1"] and study.job_slots(None) == [None]
    for gpus, k, message in [("0,0", 1, "give distinct ids"), (None, 2, "and --gpus with K > 1"),
                             ("0", 0, "give K >= 1")]:
        with pytest.raises(study.SpecError, match=re.escape(message)):
            study.job_slots(gpus, k)
    jobs = [study.Job(f"{n}-s0", "pretrain", tmp_path / n, ["pretrain"], 0) for n in "abcde"]
    finished, started, live = set(), [], []

    class Proc(FakeProc):
        def poll(self):
            if super().poll() is not None and self in live:
                live.remove(self)
            return self.returncode

    def start(job, gpu, logs):
        started.append((job.name, gpu, len(live)))  # how many ran beside it when it started
        live.append(Proc(job, finished, 0))
        return live[-1]

    _fake_processes(monkeypatch, study, start, finished)
    assert study.run_jobs(jobs, gpus=study.job_slots("0,1", 2), budget=None, logs=tmp_path) == 0
    assert started[:4] == [("a-s0", "0", 0), ("b-s0", "1", 1), ("c-s0", "0", 2), ("d-s0", "1", 3)]
    assert started[4][0] == "e-s0" and finished == {f"{n}-s0" for n in "abcde"}


def test_the_committed_results_regenerate_from_their_run_records(tmp_path, monkeypatch):
    """docs/RESULTS.md's tables come from docs/results/report.md, which `fastse report` rebuilds, as is, from
    the committed run folders (the command in RESULTS.md)."""
    monkeypatch.chdir(REPO)
    folders = sorted(Path("docs/results/sts_vs_ema").glob("*-s*"))
    assert len(folders) >= 10
    _, text = write_report(folders, tmp_path, title="STS vs EMA on CIFAR-10 (issue 7)")
    assert text.strip() == (REPO / "docs" / "results" / "report.md").read_text().strip()
    assert {p.name for p in tmp_path.glob("*.png")} <= {p.name for p in (REPO / "docs" / "results").glob("*.png")}
