"""Self-supervised methods with a smoothed teacher, behind one interface.

A `Method` holds `student` (every module the optimizer trains; DDP wraps it), `teacher` (a copy of
the student's backbone + projector, never trained, updated by a `fastse.smoothing.Smoother` from
the module pair `smoothing_pairs()`), and returns the loss of a batch of views from `forward`. The
trainer may route the calls through wrappers (DDP, `torch.compile`) with `wrap`; the modules stay
plain, so checkpoints and the teacher update see the same parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn


class Encoder(nn.Module):
    """backbone -> head: images [N, 3, H, W] -> embeddings [N, D]; `.backbone` gives features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Embeddings [N, D]; with `features`, (embeddings, backbone features [N, F])."""
        f = self.backbone(x)
        return (self.head(f), f) if features else self.head(f)


class Method(nn.Module):
    """Base class: `student`, `teacher`, `forward(views) -> scalar loss`, `smoothing_pairs()`."""

    student: nn.Module
    teacher: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.__dict__["_calls"] = {}  # wrappers are not submodules: no duplicate state_dict entries
        self.keep_features = False
        self.features: Tensor | None = None  # teacher backbone features [N, F] of one view, no grad
        self.feature_index: Tensor | None = None  # their rows' places in the global batch, where shuffled

    def want_features(self, on: bool = True) -> Method:
        """With `on`, every `forward` keeps the teacher's backbone features of one view (BYOL: the first;
        MoCo: the key view) in `features`, for the online probe at no extra compute, and, where they are of
        other samples than this rank's batch (MoCo's shuffle-BN under DDP), the indices of their samples
        in the global batch in `feature_index`."""
        self.keep_features = on
        return self

    def wrap(self, *, student: Callable | None = None, teacher: Callable | None = None) -> Method:
        """Call `student` / `teacher` (e.g. DDP- or compile-wrapped modules) in `forward`."""
        if student is not None:
            self._calls["student"] = student
        if teacher is not None:
            self._calls["teacher"] = teacher
        return self

    def student_fn(self, *args: Tensor):
        return self._calls.get("student", self.student)(*args)

    def teacher_fn(self, *args: Tensor):
        return self._calls.get("teacher", self.teacher)(*args)

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def smoothing_pairs(self) -> tuple[nn.Module, nn.Module]:
        """(student module, teacher module) with the same parameter names: what the Smoother updates."""
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:
        """The teacher's backbone: what the kNN monitor measures and `backbone.safetensors` holds."""
        return self.teacher.backbone

    @property
    def student_backbone(self) -> nn.Module:
        """The student's backbone (the trained one), for comparing it with the teacher's."""
        return self.smoothing_pairs()[0].backbone

    def state_tensors(self) -> dict[str, Tensor]:
        """Buffers outside student and teacher (e.g. MoCo's queue), for checkpoints."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("student.", "teacher."))}


# what `build_method` reads of a run's settings (every other key is ignored)
METHOD_SETTINGS = ("method", "arch", "cifar_stem", "proj_hidden_dim", "proj_dim", "pred_hidden_dim", "queue_size",
                   "temperature", "syncbn")


def build_method(settings: Mapping[str, Any] | None = None, /, **overrides: Any) -> Method:
    """The method of a run's settings with a fresh ResNet backbone: `settings` (a plain mapping, e.g.
    `PretrainConfig.to_dict()` or a run folder's saved config, resolved: no None head sizes) updated by
    `overrides`. Reads METHOD_SETTINGS: method (byol | mocov2), arch, cifar_stem (default False), proj_hidden_dim,
    proj_dim, BYOL's pred_hidden_dim, MoCo's queue_size and temperature, syncbn (SyncBatchNorm, default False);
    other keys are ignored. ValueError names a missing or unset setting. The one place a method's networks are
    built: the pretraining trainer and `eval.load` (a run folder's model) both call it."""
    from fastse.methods.byol import BYOL
    from fastse.methods.moco import MoCoV2
    from fastse.models import resnet_backbone

    s = {**(settings or {}), **overrides}
    method = s.get("method")
    needs = {"byol": ("arch", "proj_hidden_dim", "proj_dim", "pred_hidden_dim"),
             "mocov2": ("arch", "proj_hidden_dim", "proj_dim", "queue_size", "temperature")}
    if method not in needs:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(needs)}")
    missing = [k for k in needs[method] if s.get(k) is None]
    if missing:
        raise ValueError(f"method={method} needs {', '.join(missing)} (not given)")
    syncbn = bool(s.get("syncbn", False))
    backbone = resnet_backbone(s["arch"], cifar_stem=bool(s.get("cifar_stem", False)))
    if method == "byol":
        return BYOL(backbone, proj_hidden_dim=s["proj_hidden_dim"], proj_dim=s["proj_dim"],
                    pred_hidden_dim=s["pred_hidden_dim"], syncbn=syncbn)
    return MoCoV2(backbone, hidden_dim=s["proj_hidden_dim"], dim=s["proj_dim"], queue_size=s["queue_size"],
                  temperature=s["temperature"], syncbn=syncbn)


__all__ = ["Method", "Encoder", "build_method", "METHOD_SETTINGS"]
