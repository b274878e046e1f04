"""The installed package: imports without DALI, the console script."""

import shutil
import subprocess
import sys
from pathlib import Path

BLOCK_DALI = """
import importlib.abc, sys
class NoDali(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ImportError("DALI is not installed here")
sys.meta_path.insert(0, NoDali())
"""


def test_library_imports_without_dali():
    code = BLOCK_DALI + """
import fastse, fastse.smoothing, fastse.models, fastse.pipelines.loader, fastse.pipelines.tensor_backend
from fastse.pipelines import dali_backend
assert not dali_backend.dali_available()
try:
    dali_backend.require_dali()
except ImportError as e:
    assert "fastse[cu13]" in str(e), e
else:
    raise AssertionError("require_dali passed without DALI")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_console_script():
    exe = shutil.which("fastse", path=str(Path(sys.executable).parent))
    assert exe, "the fastse console script is not installed next to this Python"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "data" in out.stdout, out.stderr
