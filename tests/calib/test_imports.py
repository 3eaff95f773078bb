"""calib/ runs where the runtime runs: importing any of it must not pull in torch (DESIGN.md)."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

CALIB = Path(__file__).resolve().parents[2] / "calib"


def test_calib_imports_no_torch():
    modules = [f"sparsezip_deploy.calib.{m.name}" for m in pkgutil.iter_modules([str(CALIB)])]
    code = f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; print(sorted(" \
           "{'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
