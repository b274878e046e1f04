"""`fastse.choices`, the one home of every list of choices, and the teacher rule's one name, `rule` (called
`smoothing` before): configs, run folders and flags that use the old name are still read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastse.cli.main import main

from fastse import choices
from fastse.pretrain.config import PretrainConfig, preset
from fastse.semi.config import SemiConfig
from fastse.semi.config import preset as semi_preset
from fastse.settings import read_config_file

# ------------------------------------------------------------------------------------------ the lists


def test_the_choices_import_no_torch():
    """The configs and `fastse --help` read the lists without importing torch."""
    for module in ("fastse.choices", "fastse.cli.main"):
        code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch imported'"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, f"{module}: {done.stderr}"


def test_every_list_is_the_one_of_fastse_choices():
    from fastse.cli import evaluate, pretrain, semi, training
    from fastse.pipelines import loader, recipes

    from fastse import smoothing
    from fastse.eval import linear, load
    from fastse.models import resnet
    from fastse.pretrain import config
    from fastse.semi import config as semi_config

    assert config.RULES is smoothing.RULES is pretrain.CHOICES["rule"] is semi.CHOICES["rule"] is choices.RULES
    assert config.GRANULARITIES is smoothing.GRANULARITIES is semi.CHOICES["granularity"] is choices.GRANULARITIES
    assert config.BUFFER_MODES is smoothing.BUFFER_MODES is choices.BUFFER_MODES
    assert smoothing.KERNELS is choices.KERNELS
    assert config.ARCHS is resnet.ARCHS is load.ARCHS is evaluate.ARCHS is pretrain.CHOICES["arch"] is choices.ARCHS
    assert config.AUGMENTATIONS is recipes.AUGMENTATIONS is pretrain.CHOICES["augmentation"] is choices.AUGMENTATIONS
    assert config.LOADERS is loader.BACKENDS is pretrain.CHOICES["loader"] is choices.LOADERS
    assert config.COMPILE_MODES is semi_config.COMPILE_MODES is training.COMPILE_MODES is choices.COMPILE_MODES
    assert config.WANDB_MODES is semi_config.WANDB_MODES is training.WANDB_MODES is choices.WANDB_MODES
    assert config.DTYPES is semi_config.DTYPES is choices.DTYPES
    assert config.MONITORS is pretrain.MONITORS is choices.MONITORS
    assert semi_config.MONITORS is semi.CHOICES["monitor"] is choices.SEMI_MONITORS
    assert semi_config.DATASETS is semi.CHOICES["dataset"] is choices.SEMI_DATASETS
    assert semi_config.BUFFER_MODES is semi.CHOICES["buffers"] is choices.SEMI_BUFFER_MODES
    assert load.WHICH is choices.WHICH
    # lists that name what a module defines, and the type hints of fastse.smoothing
    assert tuple(config.PRESETS) == pretrain.PRESET_NAMES == choices.PRETRAIN_PRESETS
    assert tuple(semi_config.PRESETS) == semi.PRESET_NAMES == choices.SEMI_PRESETS
    assert tuple(linear.PROTOCOLS) == choices.LINEAR_PROTOCOLS
    assert set(choices.AUGMENTATIONS) <= set(recipes.RECIPES)
    assert typing.get_args(smoothing.Rule) == choices.RULES
    assert typing.get_args(smoothing.Granularity) == choices.GRANULARITIES
    assert typing.get_args(smoothing.BufferMode) == choices.BUFFER_MODES
    assert set(choices.SEMI_DATASETS) <= set(choices.DATASETS)
    assert set(choices.SEMI_BUFFER_MODES) <= set(choices.BUFFER_MODES)


# ------------------------------------------------------------------------ rule, called smoothing before


def test_rule_is_the_field_and_smoothing_its_old_keyword():
    assert PretrainConfig().rule == SemiConfig().rule == "sts"
    assert preset("byol-cifar10", smoothing="ema").rule == "ema"
    assert PretrainConfig().replace(smoothing="se").rule == "se"
    assert semi_preset("fixmatch-cifar10", smoothing="ema").rule == "ema"
    assert SemiConfig().replace(smoothing="se").rule == "se"
    assert preset("byol-cifar10", rule="ema", smoothing="ema").rule == "ema"  # both names, one value
    assert preset("byol-cifar10", rule="se").smoothing == "se"  # read-only alias
    assert "smoothing" not in PretrainConfig().to_dict() and "smoothing" not in SemiConfig().to_dict()
    with pytest.raises(ValueError, match="smoothing='ema' and rule='sts'"):
        preset("byol-cifar10", smoothing="ema", rule="sts")
    with pytest.raises(ValueError, match="rule='swa' is not one of ema, se, sts"):
        SemiConfig(data="cifar10").replace(smoothing="swa").validate()


@pytest.mark.parametrize("settings", [PretrainConfig, SemiConfig])
def test_config_files_written_with_smoothing_are_read_as_rule(settings, tmp_path):
    config = settings(data="cifar10").to_dict()
    config = {("smoothing" if k == "rule" else k): ("ema" if k == "rule" else v) for k, v in config.items()}
    run_json = tmp_path / "run" / "run.json"
    run_json.parent.mkdir()
    run_json.write_text(json.dumps({"config": config, "starts": []}))  # a run folder of an older fastse
    for path in (run_json, run_json.parent):
        name, values = read_config_file(path, settings)
        assert values["rule"] == "ema" and "smoothing" not in values and list(values) == list(settings().to_dict())
        assert settings(**values).rule == "ema"
    toml = tmp_path / "old.toml"
    toml.write_text('smoothing = "se"\n')
    assert read_config_file(toml, settings) == (None, {"rule": "se"})
    toml.write_text('smoothing = "se"\nrule = "sts"\n')
    with pytest.raises(ValueError, match=f"{toml}: smoothing='se' and rule='sts'"):
        read_config_file(toml, settings)


@pytest.mark.parametrize("command,base", [("pretrain", ["--preset", "byol-cifar10"]), ("semi", [])])
def test_smoothing_flag_is_an_alias_of_rule(command, base, tmp_path):
    for flag in ("--rule", "--smoothing"):
        result = CliRunner().invoke(main, [command, *base, "--data", "cifar10", flag, "ema", "--print-config"])
        assert result.exit_code == 0, result.output
        assert 'rule = "ema"' in result.output and "smoothing" not in result.output
    old = tmp_path / "old.toml"
    old.write_text('smoothing = "se"\n')
    result = CliRunner().invoke(main, [command, *base, "--data", "cifar10", "--config", str(old), "--print-config"])
    assert result.exit_code == 0 and 'rule = "se"' in result.output, result.output
    help_text = CliRunner().invoke(main, [command, "--help"]).output
    assert "--rule, --smoothing [ema|se|sts]" in help_text


def _as_before_the_rename(folder: Path) -> None:
    """Rewrite the configs a run folder records (run.json, every checkpoint's meta.json) as fastse wrote them
    before `smoothing` was renamed `rule` (meta.json is not among the checksummed files)."""
    for path in [folder / "run.json", *folder.glob("**/meta.json")]:
        info = json.loads(path.read_text())
        assert "rule" in info["config"], path
        info["config"] = {("smoothing" if k == "rule" else k): v for k, v in info["config"].items()}
        path.write_text(json.dumps(info, indent=1))


def test_a_run_folder_written_before_the_rename(tiny_run, tiny_cifar, tmp_path):
    """read back as `rule` by --config, --resume, fastse report and the evaluations' loading."""
    from fastse.engine.runs import changed_fields, find_checkpoint
    from fastse.eval.load import load_backbone_for_eval
    from fastse.pretrain.trainer import _FIXED, _RESUMABLE
    from fastse.report import build_tables, load_run, teacher_label

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    _as_before_the_rename(old)
    assert '"smoothing": "sts"' in (old / "run.json").read_text()
    _, values = read_config_file(old, PretrainConfig)
    config = PretrainConfig(**values)
    assert config.rule == "sts"
    # the evaluations load the run's model from its checkpoint's config
    assert load_backbone_for_eval(old, which="student").feature_dim == 512
    # fastse report: the old run and a new one of the same settings are one row, labelled by their rule
    run = load_run(old)
    assert run.config["rule"] == "sts" and "smoothing" not in run.config and teacher_label(run.config).startswith("sts")
    (table,) = build_tables([load_run(tiny_run), run])
    assert len(table.groups) == 1 and len(table.groups[0].runs) == 2
    # --resume: the checkpoint's fixed settings compare under their new names; nothing reads as changed
    start = find_checkpoint(old, True, config=config.replace(out=str(old)).to_dict(), fixed=_FIXED, say=print)
    assert start is not None and start[1]["config"]["rule"] == "sts"
    assert changed_fields(start[1]["config"], config.replace(out=str(old)).to_dict(), _RESUMABLE) == ""
    result = CliRunner().invoke(main, ["pretrain", "--config", str(old), "--out", str(old), "--data", str(tiny_cifar),
                                       "--resume", "--max-steps", "5"])
    assert result.exit_code == 0, result.output
    assert "resuming with changed settings" not in result.output
    assert (old / "checkpoints" / "step-000000005").is_dir()
    assert json.loads((old / "run.json").read_text())["config"]["rule"] == "sts"
