"""wandb's settings as fastse reads them, before any run starts: the mode (`wandb_mode`: wandb's own
environment, then credentials), tags, and one-line checks of a run config's `wandb_*` fields. No wandb
and no torch imported: the configs validate with these, and `engine.logging` starts runs with them.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}  # WANDB_MODE values wandb accepts
_BAD_NAME_CHARS = "/\\#?%:"  # not allowed in wandb project and entity names


def wandb_mode(mode: str) -> str:
    """`auto` -> WANDB_MODE where set (WANDB_DISABLED=true: "disabled"), else "online" where wandb
    credentials are configured (WANDB_API_KEY, or an api.wandb.ai entry in the netrc file), else
    "offline"; other modes as given. An unknown WANDB_MODE raises ValueError."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env not in _ENV_MODES:
            raise ValueError(f"WANDB_MODE={os.environ['WANDB_MODE']!r} is not one of online, offline, disabled")
        return _ENV_MODES[env]
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if netrc.netrc(path).authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def wandb_tags(tags: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """Tags from a comma-separated string (the flag) or a list (a config file); None when not given."""
    if tags is None:
        return None
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    return [str(t).strip() for t in items]


def check_wandb_settings(config: Any) -> None:
    """Raise ValueError with one line for a wandb setting of `config` (a run config's `wandb_*` fields)
    or a WANDB_MODE that wandb would refuse."""
    wandb_mode(getattr(config, "wandb", "auto"))
    for field in ("wandb_project", "wandb_entity", "wandb_group", "wandb_name"):
        value = getattr(config, field, None)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip() or len(value) > 128:
            raise ValueError(f"{field}={value!r} must be a name of 1 to 128 characters")
        if field in ("wandb_project", "wandb_entity") and (bad := set(value) & set(_BAD_NAME_CHARS)):
            raise ValueError(f"{field}={value!r}: a wandb {field[6:]} name cannot hold {' '.join(sorted(bad))}")
    tags = getattr(config, "wandb_tags", None)
    if tags is not None and not isinstance(tags, (str, list, tuple)):
        raise ValueError(f"wandb_tags={tags!r} must be comma-separated tags")
    for tag in wandb_tags(tags) or ():
        if not 1 <= len(tag) <= 64:
            raise ValueError(f"wandb_tags={tags!r}: every tag must have 1 to 64 characters")
