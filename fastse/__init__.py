"""fastse: fast, faithful student-teacher learning (EMA, Spatial Ensemble and STS teachers)."""

# fastse.pipelines and fastse.cli are the checkout's pipelines/ and cli/ (pyproject's package-dir): they
# import once fastse is installed (`make setup` installs the checkout editable; else `pip install -e .`).

__version__ = "0.1.0"
