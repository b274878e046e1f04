"""fastse: fast, faithful student-teacher learning (EMA, Spatial Ensemble and STS teachers)."""

from pathlib import Path as _Path

# Installed, pipelines/ and cli/ are the subpackages fastse.pipelines and fastse.cli (pyproject's
# package-dir). Run from a source checkout without installing (benchmarks, the GPU machine), the
# same names resolve through the checkout's root.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "pipelines" / "recipes.py").is_file():
    __path__.append(str(_checkout))

__version__ = "0.1.0"
