"""The Avalanche suite runs in its own venv (``make test-avalanche``: torch 2.14.1 and avalanche-lib; Avalanche
does not load beside the main suite's torch 2.13). mas-local comes from the checkout on ``PYTHONPATH``.

The checkout's compiled extension ``mas_local/_C.so`` is the main venv's build, made against torch 2.13; it is
not this torch's, so this suite forces the pure-torch backend instead of loading it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["MAS_LOCAL_BACKEND"] = "torch"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# a missing avalanche is an error here, never a skip: this venv exists to run these tests
import avalanche  # noqa: E402,F401
