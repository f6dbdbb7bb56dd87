"""Run a snippet in a fresh interpreter: what ``import`` loads, and which errors a missing package gives, can only be
seen in a process that has not imported anything yet."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str, timeout: int = 120) -> str:
    """Run ``code`` with this venv's Python; assert it exits 0 and return what it printed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout
