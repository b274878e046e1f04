"""The layering of fastse (issue #20, "one house"): no module imports from a higher layer, and pretraining and
FixMatch are siblings that never import each other. Parsed with ast, nothing imported (CPU, no torch): every
import of a fastse module counts, at module level, inside a function or class (lazy) and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"fastse": ROOT / "fastse", "fastse.pipelines": ROOT / "pipelines", "fastse.cli": ROOT / "cli"}

# bottom (0) to top (6); an entry ending in ".*" is the package and everything under it
LAYERS: list[tuple[str, ...]] = [
    ("fastse", "fastse.choices", "fastse.atomic", "fastse.philox", "fastse.runlock", "fastse.wandb_settings",
     "fastse.results", "fastse.distributed", "fastse.tensorfiles", "fastse.settings"),
    ("fastse.smoothing", "fastse._smooth_triton", "fastse.models.*", "fastse.pipelines.*"),
    ("fastse.methods.*",),
    ("fastse.engine.*", "fastse.checkpoints"),
    ("fastse.eval.*",),
    ("fastse.pretrain.*", "fastse.semi.*"),
    ("fastse.report", "fastse.cli.*"),
]
SIBLINGS = ("fastse.pretrain", "fastse.semi")  # within their layer, neither may import the other


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            pkg = name[:-2] if name.endswith(".*") else None
            hit = (module == pkg or module.startswith(pkg + ".")) if pkg else module == name
            length = len(pkg or name)
            if hit and length > best_len:
                best, best_len = i, length
    return best


def sibling_of(module: str) -> str | None:
    return next((s for s in SIBLINGS if module == s or module.startswith(s + ".")), None)


def modules() -> dict[str, Path]:
    """module name -> file, for every .py file of the three trees."""
    found = {}
    for prefix, tree in TREES.items():
        for path in sorted(tree.rglob("*.py")):
            parts = list(path.relative_to(tree).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported fastse module) of every import in `path` (module `name`), wherever it stands."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{mod}.{alias.name}"
                out.append((node.lineno, sub if sub in known else mod))
    return [(line, t) for line, t in out if t == "fastse" or t.startswith("fastse.")]


FOUND = modules()
IMPORTS = [(src, line, target) for src, path in FOUND.items() for line, target in imports_of(src, path, set(FOUND))]


def test_the_trees_are_found():
    assert {"fastse.settings", "fastse.engine.base", "fastse.pretrain.trainer", "fastse.semi.trainer",
            "fastse.pipelines.resolve", "fastse.cli.main"} <= set(FOUND)
    assert len(IMPORTS) > 100


def test_every_module_has_a_layer():
    """A new module (or one imported that does not exist) must be placed in LAYERS first."""
    unplaced = sorted({m for m in [*FOUND, *(t for _, _, t in IMPORTS)] if layer_of(m) is None})
    assert not unplaced, f"modules in no layer of tests/test_layers.py: {', '.join(unplaced)}"


def test_no_import_climbs_to_a_higher_layer():
    upward = [f"L{layer_of(src)} {src} ({FOUND[src].relative_to(ROOT)}:{line}) -> L{layer_of(target)} {target}"
              for src, line, target in IMPORTS
              if layer_of(src) is not None and layer_of(target) is not None and layer_of(target) > layer_of(src)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_pretrain_and_semi_do_not_import_each_other():
    crossing = [f"{src} ({FOUND[src].relative_to(ROOT)}:{line}) -> {target}" for src, line, target in IMPORTS
                if sibling_of(src) and sibling_of(target) and sibling_of(src) != sibling_of(target)]
    assert not crossing, "imports between fastse.pretrain and fastse.semi:\n" + "\n".join(crossing)


@pytest.mark.parametrize("module, target, expected", [
    ("fastse.settings", "fastse.pretrain.config", False),
    ("fastse.engine.runs", "fastse.eval.load", False),
    ("fastse.eval.load", "fastse.methods", True),
    ("fastse.cli.pretrain", "fastse.pretrain.trainer", True),
])
def test_the_rule_itself(module, target, expected):
    assert (layer_of(target) <= layer_of(module)) is expected
