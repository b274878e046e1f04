"""wandb as its users expect it, and progress people can read (issue 19, items 1 and 5): wandb's environment
loses to the flags, a resumed run continues its wandb run with increasing steps, evaluations land in the run
they measure, `--wandb disabled` needs no wandb, `fastse --version`, plain progress lines off a terminal.

Every wandb run here is offline, under WANDB_DIR; what it recorded is read back from its `.wandb` file.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastse.cli.main import main

from fastse.engine.logging import WANDB_RUN, RunLog, read_wandb_run, wandb_options
from fastse.pretrain.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- wandb's offline files


def _records(path: Path):
    """The protobuf records of a `.wandb` file (LevelDB log format: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, parts = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL / FIRST, else MIDDLE / LAST
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def offline_runs(wandb_dir: Path, patience: float = 30.0) -> list[dict]:
    """Every offline run under `wandb_dir` (WANDB_DIR), oldest first: its id, project, name, group, tags,
    job type, config, history rows {step: row} and summary. wandb's service process may still be
    flushing a file after `finish()` returns (seen on a loaded 2-core machine): a file without its run
    record yet is read again for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        runs = _read_offline_runs(wandb_dir)
        unfinished = [str(r["path"]) for r in runs if "started" not in r]
        if not unfinished:
            return sorted(runs, key=lambda r: r["started"])
        if time.monotonic() > deadline:
            raise AssertionError(f"no run record in {unfinished} after {patience} s")
        time.sleep(0.5)


def _read_offline_runs(wandb_dir: Path) -> list[dict]:
    runs = []
    for path in sorted((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"history": {}, "summary": {}, "path": path}
        for record in _records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                r = record.run
                run.update(id=r.run_id, project=r.project, entity=r.entity, name=r.display_name, group=r.run_group,
                           tags=list(r.tags), job_type=r.job_type, config=_items(r.config.update),
                           started=r.start_time.ToNanoseconds())
            elif kind == "history":
                run["history"][record.history.step.num] = _items(record.history.item)
            elif kind == "summary":
                run["summary"].update(_items(record.summary.update))
        runs.append(run)
    return runs


@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """wandb offline under a fresh WANDB_DIR, none of the caller's wandb settings, no credentials."""
    for name in list(os.environ):
        if name.startswith("WANDB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def pretrain(data: Path, out: Path, *extra: str):
    """`fastse pretrain` of a tiny BYOL run on CPU: 16 px, batch 10, narrow heads, a log line a step."""
    return CliRunner().invoke(main, [
        "pretrain", "--preset", "byol-cifar10", "--data", str(data), "--image-size", "16", "--batch-size", "10",
        "--epochs", "2", "--log-every", "1", "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim",
        "32", "--no-compile", "--device", "cpu", "--out", str(out), "--cache-dir", str(out.parent / "cache"), *extra])


@pytest.fixture(scope="module")
def data(cifar_subset) -> Path:
    return cifar_subset(3, 2)  # 30 train, 20 test images


# ------------------------------------------------------------------------------------------- tests


def test_environment_wins_over_defaults_and_loses_to_settings(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # credentials: auto would be online ...
    monkeypatch.setenv("WANDB_MODE", "offline")  # ... but wandb's own mode wins over the default
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    monkeypatch.setenv("WANDB_ENTITY", "env-entity")
    for name, config in (("env", PretrainConfig()),
                         ("flags", PretrainConfig(wandb_project="flag-project", wandb_entity="flag-entity",
                                                  wandb_group="sts-vs-ema", wandb_tags="sts, cifar10",
                                                  wandb_name="my-run"))):
        log = RunLog(tmp_path / name, config.to_dict(), **wandb_options(config, "pretrain"))
        log.log({"step": 1, "loss": 0.5})
        log.close()
    env, flags = offline_runs(offline)
    assert (env["project"], env["entity"], env["name"], env["group"], env["tags"], env["job_type"]) == (
        "env-project", "env-entity", "env", "", [], "pretrain")
    assert (flags["project"], flags["entity"], flags["name"], flags["group"], flags["tags"]) == (
        "flag-project", "flag-entity", "my-run", "sts-vs-ema", ["sts", "cifar10"])
    assert env["history"][1]["loss"] == 0.5
    import fastse

    assert env["config"]["fastse_version"] == fastse.__version__
    assert env["config"]["git_commit"] is None or len(env["config"]["git_commit"]) >= 40  # HEAD in a checkout
    assert read_wandb_run(tmp_path / "env")["id"] == env["id"] != flags["id"]
    # an explicit mode beats WANDB_MODE; WANDB_MODE=disabled beats the default
    RunLog(tmp_path / "off", {}, wandb="disabled").close()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    RunLog(tmp_path / "off-env", {}, wandb="auto").close()
    assert len(offline_runs(offline)) == 2
    assert not (tmp_path / "off" / WANDB_RUN).exists() and not (tmp_path / "off-env" / WANDB_RUN).exists()


def test_wandb_flags_of_pretrain_name_the_run_and_bad_values_exit_2(offline, data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "env-project")
    result = pretrain(data, tmp_path / "run", "--max-steps", "1", "--wandb", "offline", "--wandb-project",
                      "flag-project", "--wandb-group", "study", "--wandb-tags", "ema,seed0")
    assert result.exit_code == 0, result.output
    [run] = offline_runs(offline)
    assert (run["project"], run["group"], run["tags"], run["name"]) == ("flag-project", "study", ["ema", "seed0"],
                                                                       "run")
    assert run["config"]["wandb_group"] == "study" and run["id"] == read_wandb_run(tmp_path / "run")["id"]
    for args, message in ((["--wandb-project", "a/b"], "--wandb-project='a/b': a wandb project name cannot hold /"),
                          (["--wandb-tags", "a,,b"], "--wandb-tags='a,,b': every tag must have 1 to 64 characters")):
        bad = pretrain(data, tmp_path / "bad", "--max-steps", "1", *args)
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    bad = pretrain(data, tmp_path / "bad", "--max-steps", "1")
    assert bad.exit_code == 2 and "WANDB_MODE='sometimes' is not one of online, offline, disabled" in bad.output


def test_resume_continues_the_wandb_run_with_increasing_steps(offline, data, tmp_path):
    out = tmp_path / "run"
    first = pretrain(data, out, "--max-steps", "2")  # checkpoint at step 2
    assert first.exit_code == 0, first.output
    with open(out / "metrics.jsonl", "a") as f:  # the previous attempt got to step 3 before it was killed
        f.write(json.dumps({"step": 3, "epoch": 1.0, "loss": 9.0}) + "\n")
    resumed = pretrain(data, out, "--max-steps", "4", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = offline_runs(offline)
    assert a["id"] == b["id"] == read_wandb_run(out)["id"]
    assert max(a["history"]) == 2 and min(b["history"]) == 4  # step 3 is in wandb's run already: not sent again
    assert "knn_top1" in b["history"][4] and b["history"][4]["epoch"] == pytest.approx(4 / 3)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in lines if m.get("step") == 3 and "loss" in m] != [9.0]  # step 3 written again


def test_evaluations_land_in_the_run_they_measure(offline, data, tmp_path):
    out = tmp_path / "run"
    assert pretrain(data, out, "--max-steps", "3").exit_code == 0
    common = ["--checkpoint", str(out), "--data", str(data), "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    knn = CliRunner().invoke(main, ["knn", *common, "--k", "5"])
    assert knn.exit_code == 0, knn.output
    linear = CliRunner().invoke(main, ["eval-linear", *common, "--protocol", "fast", "--epochs", "4",
                                       "--batch-size", "10"])
    assert linear.exit_code == 0, linear.output
    train, knn_run, linear_run = offline_runs(offline)
    assert train["id"] == knn_run["id"] == linear_run["id"]  # one wandb run: the pretraining's
    last = max(train["history"])
    [(knn_step, row)] = knn_run["history"].items()
    assert knn_step == last + 1 and row["epoch"] == pytest.approx(3 / 3)
    assert 0 <= row["eval/knn_top1"] <= row["eval/knn_top5"] <= 100
    assert knn_run["summary"]["eval/knn_top1"] == row["eval/knn_top1"]
    [(linear_step, row)] = linear_run["history"].items()
    assert linear_step == knn_step + 1 and "eval/linear_fast_top1" in row
    assert any(k.startswith("eval/linear_fast_curve") for k in row)  # the head's test top-1 by epoch, a chart
    assert linear_run["summary"]["eval/linear_fast_top1"] == row["eval/linear_fast_top1"]
    assert read_wandb_run(out)["step"] == linear_step
    # a plain state dict: a run of the evaluation's own
    import torch
    import torchvision

    file = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), file)
    plain = CliRunner().invoke(main, ["knn", *common[2:], "--checkpoint", str(file), "--arch", "resnet18", "--k",
                                      "5", "--wandb-group", "baselines"])
    assert plain.exit_code == 0, plain.output
    own = offline_runs(offline)[-1]
    assert own["id"] != train["id"] and own["job_type"] == "eval" and own["group"] == "baselines"
    assert own["name"] == "r18-knn" and "top1" in own["summary"]


def test_wandb_disabled_needs_no_wandb(data, tmp_path):
    code = ("import json, sys; sys.modules['wandb'] = None\n"  # `import wandb` raises ImportError
            "from fastse.cli.main import main\n"
            "for args in json.loads(sys.argv[1]): main(args, standalone_mode=False)")
    out, cache = str(tmp_path / "run"), str(tmp_path / "c")
    commands = [["pretrain", "--preset", "byol-cifar10", "--data", str(data), "--image-size", "16", "--batch-size",
                 "10", "--max-steps", "1", "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32",
                 "--no-compile", "--device", "cpu", "--out", out, "--cache-dir", cache, "--wandb", "disabled"],
                ["knn", "--checkpoint", out, "--data", str(data), "--k", "5", "--device", "cpu", "--wandb", "disabled",
                 "--cache-dir", cache]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step 1/1" in done.stdout and "knn: top-1" in done.stdout
    assert not (tmp_path / "run" / WANDB_RUN).exists()


def test_version(monkeypatch):
    import fastse

    monkeypatch.setenv("FASTSE_COMMIT", "abc123")
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"fastse {fastse.__version__} (commit abc123)\n"


def test_progress_off_a_terminal_is_plain_lines(data, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTSE_PROGRESS", raising=False)
    result = pretrain(data, tmp_path / "run", "--max-steps", "3", "--wandb", "disabled")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    assert [line.split(" | ")[1] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "eta " in lines[-1] and "\r" not in result.output and "it/s" not in result.output
    linear = CliRunner().invoke(main, ["eval-linear", "--checkpoint", str(tmp_path / "run"), "--data", str(data),
                                       "--protocol", "fast", "--epochs", "20", "--batch-size", "10", "--device",
                                       "cpu", "--wandb", "disabled", "--cache-dir", str(tmp_path / "c")])
    assert linear.exit_code == 0, linear.output
    progress = [line for line in linear.output.splitlines() if line.startswith("linear fast: epoch")]
    assert [line.split(" | ")[0] for line in progress] == [f"linear fast: epoch {e}/20" for e in range(2, 21, 2)]
    assert all("| test top-1 " in line and "| eta " in line for line in progress)
    assert "fast: top-1" in linear.output


def test_progress_bar_on_a_terminal(capsys, monkeypatch):
    from fastse.engine.progress import Progress, echo

    monkeypatch.setenv("FASTSE_PROGRESS", "bar")  # as on a terminal
    with Progress(8, initial=2, desc="run") as bar:
        for _ in range(6):
            bar.update()
        echo("a log line")
    out, err = capsys.readouterr()
    assert "a log line\n" in out and "8/8" in err and "<" in err  # elapsed<remaining: the ETA
    monkeypatch.setenv("FASTSE_PROGRESS", "plain")
    with Progress(8) as bar:
        bar.update(8)
        echo("plain")
    assert capsys.readouterr() == ("plain\n", "")


def test_semi_names_its_run_and_resume_continues_it(offline, data, tmp_path):
    def semi(*extra: str):
        return CliRunner().invoke(main, [
            "semi", "--data", str(data), "--num-labels", "20", "--depth", "10", "--widen", "1", "--labeled-batch", "8",
            "--mu", "2", "--total-steps", "4", "--eval-every", "2", "--log-every", "1", "--device", "cpu",
            "--no-compile", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c"), *extra])

    first = semi("--max-steps", "2", "--wandb-group", "fixmatch-sts", "--wandb-tags", "sts")
    assert first.exit_code == 0, first.output
    resumed = semi("--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = offline_runs(offline)
    assert a["id"] == b["id"] and (a["job_type"], a["group"], a["tags"], a["name"]) == ("semi", "fixmatch-sts",
                                                                                        ["sts"], "run")
    assert sorted(a["history"]) == [0, 1, 2] and sorted(b["history"]) == [3, 4]  # 0: the views before step 1
    assert "views/path" in a["history"][0] and "teacher_acc" in b["history"][4]


def test_linear_eval_tests_every_few_epochs_without_changing_the_training(data, tmp_path):
    from fastse.eval.linear import eval_data, get_protocol, linear_eval
    from fastse.models.resnet import resnet_backbone

    evaluation = eval_data(str(data), dataset="cifar10", cache_dir=str(tmp_path / "c"))
    protocol = get_protocol("byol", small=evaluation.small, epochs=2, batch_size=15)  # BatchNorm head, autograd
    net = resnet_backbone("resnet18", cifar_stem=True)

    def run(every: int):
        losses, tests = [], []
        result = linear_eval(net, evaluation, protocol, device="cpu", seed=1, on_epoch=lambda e, v: losses.append(v),
                             test_every=every, on_test=lambda e, acc: tests.append((e, acc)))
        return losses, tests, result

    (plain_losses, none, plain), (losses, tests, checked) = run(0), run(1)
    assert none == [] and [e for e, _ in tests] == [1, 2]
    assert losses == plain_losses  # the checks leave the head in training mode: the same steps
    assert tests[-1][1] == {"top1": checked["top1"], "top5": checked["top5"]}
    assert (checked["top1"], checked["top5"]) == (plain["top1"], plain["top5"])
