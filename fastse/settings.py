"""The settings machinery that every config shares (`fastse.pretrain.config`, `fastse.semi.config`,
`fastse.eval.linear`) and the run folders' readers use (`engine.runs`, `report`): checks of a field, the
renamed settings (RENAMED), config files (TOML / JSON / a run folder's run.json) and writing a config as
TOML. Standard library only (no torch): `fastse --help` and the CLI's config handling import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from pathlib import Path
from typing import Any

__all__ = ["require_finite", "check_choice", "CONFIG_SUFFIXES", "LIST_FIELDS", "RENAMED", "renamed",
           "read_config_file", "config_toml"]


class RunSettings:
    """What the configs of every run kind (`PretrainConfig`, `SemiConfig`) share beyond their fields:
    `data_spec` and read-only old names of renamed fields. A plain base class: the dataclass fields stay
    the subclasses' own."""

    data: str | None
    dataset: str | None
    rule: str
    out: str

    @property
    def data_spec(self) -> str:
        """What `resolve_data` reads: `data`, else the dataset's name (cifar10/cifar100: a torchvision download)."""
        return self.data or self.dataset or ""

    @property
    def smoothing(self) -> str:
        """The old name of `rule` (read-only; `replace` and `preset` also take `smoothing=`)."""
        return self.rule

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_run(self) -> None:
        """What every run kind's `validate` checks first: finite numbers and a named run folder."""
        require_finite(self)
        if not str(self.out).strip():
            raise ValueError("out='' names no folder: give the run folder")


def require_finite(settings: Any) -> None:
    """Raise ValueError naming the first float field of the dataclass `settings` that is NaN or infinite
    (click's float flags take "nan" and "inf")."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name}={value} must be a finite number")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """ValueError naming `name` and the choices where `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


# ------------------------------------------------------------------------------- config files

CONFIG_SUFFIXES = (".toml", ".json")
LIST_FIELDS = frozenset({"wandb_tags"})  # str fields that a config file may also give as a list of strings
# settings renamed since configs were first written: old name -> new name. Configs saved before (a run
# folder's run.json, a checkpoint's meta.json, config files) and keyword arguments (`replace`, `preset`)
# that use the old name are read as the new one.
RENAMED = {"smoothing": "rule"}


def renamed(settings: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """`settings` ({field: value}, in order) with the old names of RENAMED under their new names; ValueError
    (its message prefixed with `where`) where both names of one setting are given different values."""
    if not RENAMED.keys() & settings.keys():
        return settings
    for old, new in RENAMED.items():
        if old in settings and new in settings and settings[old] != settings[new]:
            raise ValueError(f"{where}{old}={settings[old]!r} and {new}={settings[new]!r} set one setting ({old} is "
                             f"the old name of {new}): give {new} only")
    return {RENAMED.get(key, key): value for key, value in settings.items()}


def read_config_file(path: str | Path, settings: type) -> tuple[str | None, dict[str, Any]]:
    """(preset named in the file or None, {field: value}) of a config file for the dataclass `settings`
    (`PretrainConfig`, `SemiConfig`): TOML (.toml; top-level keys, plus an optional `preset = "NAME"`), JSON
    (.json: one object) or a run folder's `run.json` (its "config", every field resolved; a run folder
    itself names its run.json). Keys are field names (the old names of RENAMED read as the new ones);
    ValueError with one line naming the file and the first unknown key or mistyped value. Values are checked
    against the field's type, not its range (`validate` does that once flags are applied)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "run.json"
    if path.suffix not in CONFIG_SUFFIXES:
        raise ValueError(f"{path}: a config file is .toml or .json (a run folder's run.json)")
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        data = _parse_toml(text) if path.suffix == ".toml" else json.loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "starts" in data:
        data = data["config"]  # a run.json: {"config": ..., "starts": [...]}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a table of settings")
    data = dict(data)
    preset_name = data.pop("preset", None)
    if preset_name is not None and not isinstance(preset_name, str):
        raise ValueError(f"{path}: preset={preset_name!r} must be a preset's name")
    data = renamed(data, where=f"{path}: ")
    return preset_name, {key: _typed(settings, key, value, path) for key, value in data.items()}


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError("TOML config files need Python >= 3.11 or the tomli package (or use JSON)") from None
    return tomllib.loads(text)


def _typed(settings: type, key: str, value: Any, path: Path) -> Any:
    """`value` for the field `key` of the dataclass `settings` (an int given for a float field becomes a
    float); ValueError naming `path` and the key for an unknown key or a value of the wrong type."""
    hints = typing.get_type_hints(settings)
    if key not in hints or key not in {f.name for f in dataclasses.fields(settings)}:
        close = difflib.get_close_matches(str(key), [f.name for f in dataclasses.fields(settings)], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{path}: unknown setting {key!r} (not a setting of {settings.__name__}){hint}")
    allowed = typing.get_args(hints[key]) or (hints[key],)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
        value = value if int in allowed or not ok else float(value)
    elif isinstance(value, float):
        ok = float in allowed
    elif isinstance(value, str):
        ok = str in allowed
    elif isinstance(value, list) and key in LIST_FIELDS:
        ok = all(isinstance(v, str) for v in value)
    else:
        ok = False
    if not ok:
        want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{path}: {key}={value!r} must be {want}")
    return value


def config_toml(config: Any, *, title: str = "") -> str:
    """The dataclass `config` as TOML that `read_config_file` reads back to the same config: one line a
    field; fields set to None (TOML has no null) are written as comments and read back as their default,
    which is None for every such field of a resolved config."""
    lines = [f"# {title}"] if title else []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None:
            lines.append(f"# {f.name} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{f.name} = {str(value).lower()}")
        elif isinstance(value, (int, float)):
            lines.append(f"{f.name} = {value!r}")
        elif isinstance(value, str):
            lines.append(f"{f.name} = {json.dumps(value)}")  # a JSON string is a TOML basic string
        elif isinstance(value, (list, tuple)):
            lines.append(f"{f.name} = [{', '.join(json.dumps(str(v)) for v in value)}]")
        else:
            raise TypeError(f"{f.name}={value!r}: cannot be written as TOML")
    return "\n".join(lines) + "\n"
