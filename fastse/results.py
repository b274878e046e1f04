"""`eval.json`: every evaluation of a backbone (`fastse knn`, `fastse eval-linear`), kept with what it measured.

The file, in the run folder (or beside the backbone file evaluated), holds {"format": FORMAT, "results":
[...]}, oldest first. A result has "kind" ("knn", or the linear protocol: "byol", "moco", "fast"), "which"
(teacher or student), "limit" (images a split; None: all), "checkpoint", "data", "time" (UTC), its figures
("top1", "top5" in %, "seconds") and its protocol's settings. A kind's headline result, the one `fastse
report` tables, is its newest result of the teacher on all the data; the others (the student, smoke runs
with --limit) are kept and listed beside it, marked. A file of the first format (one result a kind:
{"knn": {...}, "fast": {...}}) reads as those results, and the next evaluation appends to them.
Nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastse.atomic import write_atomic

FILE = "eval.json"
FORMAT = "fastse-eval/2"
# FixMatch's figure: the median test top-1 of the last 20 evaluations (`fastse semi` reports it, `fastse report` too)
MEDIAN_OF = 20


def read_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every result in `folder`/eval.json, oldest first ([] without a readable file)."""
    try:
        data = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    if data.get("format") != FORMAT:  # the first format: kind -> its last result
        return [{**entry, "kind": kind} for kind, entry in data.items() if isinstance(entry, dict)]
    results = data.get("results")
    return [r for r in results if isinstance(r, dict) and "kind" in r] if isinstance(results, list) else []


def add_result(folder: str | Path, kind: str, result: dict[str, Any]) -> Path:
    """Append `result`, of `kind`, to `folder`/eval.json (the results there kept), atomically; its path."""
    results = [*read_results(folder), {"kind": kind, **result}]
    return write_atomic(Path(folder) / FILE, json.dumps({"format": FORMAT, "results": results}, indent=1) + "\n")


def is_headline(result: dict[str, Any]) -> bool:
    """Whether `result` measured the teacher on all the data (one that does not say counts as such)."""
    return result.get("which", "teacher") == "teacher" and result.get("limit") is None


def headlines(results: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kind -> its newest headline result, of `results` oldest first."""
    return {r["kind"]: r for r in results if is_headline(r)}


def qualifiers(result: dict[str, Any]) -> str:
    """What a result measured beyond a headline one's, e.g. `student, --limit 50, 2026-11-26`."""
    parts = [result["which"]] if result.get("which", "teacher") != "teacher" else []
    parts += [f"--limit {result['limit']}"] if result.get("limit") is not None else []
    parts += [str(result["time"])[:10]] if result.get("time") else []
    return ", ".join(parts)
