"""The backbone to evaluate, from whatever holds it: a fastse run folder (its newest complete
checkpoint), a `backbone.safetensors` export, or a plain torchvision ResNet state dict (`.pth` or
`.safetensors`, e.g. a model trained elsewhere). Anything unusable raises one `CheckpointError`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from fastse.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint
from fastse.choices import ARCHS, WHICH
from fastse.methods import build_method
from fastse.models.export import BACKBONE_FORMAT, load_backbone, resnet_arch
from fastse.models.resnet import resnet_backbone
from fastse.settings import renamed

_PREFIXES = ("module.", "backbone.", "_orig_mod.")  # DDP, fastse/lightly-style wrappers, torch.compile


def load_backbone_for_eval(
    spec: str | Path, *, which: str = "teacher", arch: str | None = None, cifar_stem: bool | None = None
) -> nn.Module:
    """The ResNet backbone (fc = Identity, eval mode, CPU) held by `spec`: images [N, 3, H, W] ->
    features [N, D].

    - a run folder: the `which` ("teacher" or "student") backbone of its newest complete checkpoint,
      the architecture from the config saved with it (`backbone.safetensors` when the folder has
      no checkpoint and `which` is the teacher);
    - a `backbone.safetensors` export (the teacher's): architecture from its metadata;
    - a torchvision ResNet state dict (`.pth`/`.pt`/`.safetensors`): needs `arch`; `module.` /
      `backbone.` prefixes are stripped, `fc.*` is ignored, the CIFAR stem is read from conv1's shape
      unless `cifar_stem` is given.
    """
    if which not in WHICH:
        raise ValueError(f"which={which!r} is not one of {', '.join(WHICH)}")
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if path.is_dir():
        return _from_run(path, which, arch)
    if path.suffix == ".safetensors" and _safetensors_meta(path).get("format") == BACKBONE_FORMAT:
        net = load_backbone(path)
        _check_arch(path, net, arch)
        _student_only_in_runs(path, which)
        return net
    _student_only_in_runs(path, which)
    return _from_state_dict(path, _read_state_dict(path), arch, cifar_stem)


def _from_run(run: Path, which: str, arch: str | None) -> nn.Module:
    latest = latest_checkpoint(run)
    if latest is None:
        if which == "teacher" and (run / "backbone.safetensors").is_file():
            net = load_backbone(run / "backbone.safetensors")
            _check_arch(run, net, arch)
            return net
        raise CheckpointError(f"{run}: no complete checkpoint (checkpoints/step-*/) "
                              + ("and no backbone.safetensors" if which == "teacher" else "to take the student from"))
    groups, meta = load_checkpoint(latest)
    try:
        settings = renamed(dict(meta["config"]))  # a config saved before a rename: the new names
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{latest}: the saved config cannot be read ({e})") from None
    if arch is not None and arch != settings.get("arch"):
        raise CheckpointError(f"{latest}: --arch {arch} does not match the run's architecture {settings.get('arch')}")
    try:
        method = build_method(settings)  # the run's networks, built as its trainer built them
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{latest}: the saved config cannot be read ({e})") from None
    try:
        method.student.load_state_dict(groups["student"])
        method.teacher.load_state_dict(groups["teacher"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{latest}: student/teacher state does not match its config ({str(e)[:200]})") from None
    student, teacher = method.smoothing_pairs()
    return (teacher if which == "teacher" else student).backbone.eval()


def _student_only_in_runs(path: Path, which: str) -> None:
    if which != "teacher":
        raise CheckpointError(f"{path}: a single backbone file holds one network; --which {which} needs a run folder")


def _safetensors_meta(path: Path) -> dict:
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors' own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        _safetensors_meta(path)
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors alike
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({str(e).splitlines()[0][:160]})") from None
    for key in ("state_dict", "model", "backbone"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (name -> tensor)")
    return obj


def _strip(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _from_state_dict(path: Path, state: dict[str, Tensor], arch: str | None, cifar_stem: bool | None) -> nn.Module:
    if arch is None:
        raise CheckpointError(f"{path}: a plain state dict does not say its architecture: give --arch "
                              f"({', '.join(ARCHS)})")
    if arch not in ARCHS:
        raise CheckpointError(f"--arch {arch!r} is not one of {', '.join(ARCHS)}")
    state = {_strip(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if cifar_stem is None:
        conv1 = state.get("conv1.weight")
        cifar_stem = conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)
    net = resnet_backbone(arch, cifar_stem=cifar_stem)
    expected = net.state_dict()
    problem = next((f"missing key {k!r}" if k not in state else
                    f"{k!r} has shape {tuple(state[k].shape)}, {arch} expects {tuple(v.shape)}"
                    for k, v in expected.items() if k not in state or state[k].shape != v.shape), None)
    problem = problem or next((f"unexpected key {k!r}" for k in state if k not in expected), None)
    if problem:
        raise CheckpointError(f"{path}: not a {arch}{' (CIFAR stem)' if cifar_stem else ''} state dict: {problem}")
    net.load_state_dict(state)
    return net.eval()


def _check_arch(path: Path, net: nn.Module, arch: str | None) -> None:
    found = resnet_arch(net)[0]
    if arch is not None and arch != found:
        raise CheckpointError(f"{path}: --arch {arch} does not match the saved backbone ({found})")
