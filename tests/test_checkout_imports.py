"""The repository root shadows no package of the ecosystem (#21): transformers probes for Hugging Face's
``kernels`` (hub kernels) when it is imported, and from the root it must not find our Triton sources there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# triton made unimportable, as in a venv without it
NO_TRITON = """
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError("No module named 'triton'")
        return None
sys.meta_path.insert(0, _NoTriton())
"""


def test_the_triton_sources_are_no_package_at_the_root():
    assert (ROOT / "kernels" / "launch.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_from_the_root_without_triton_transformers_trainer_imports_and_sees_no_hub_kernels():
    pytest.importorskip("transformers")
    code = NO_TRITON + (
        "from transformers import Trainer\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available(), 'the checkout passes for the hub kernels package'\n"
        "import mas_local.ops.backend as b\n"
        "assert 'triton' not in b.available_backends('cpu')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_package_finds_its_kernels_from_a_checkout():
    pytest.importorskip("triton")
    code = (
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import mas_local.kernels as k\n"
        "from mas_local.kernels import abs_gemm, launch, penalty, per_sample_abs\n"
        "assert k.supports('cpu') is None, k.supports('cpu')\n"
        "print(abs_gemm.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() == (ROOT / "kernels" / "abs_gemm.py").resolve()
