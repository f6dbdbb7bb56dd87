"""The Avalanche plugin from the main venv, where avalanche-lib is not installed (its tests, with Avalanche, are in
tests_avalanche/, run by ``make test-avalanche`` in a venv of their own): ``import mas_local.integrations`` loads
no Avalanche, and asking for the plugin without it names the extra to install."""

from __future__ import annotations

from tests.fresh_python import run_python


def test_import_mas_local_loads_no_avalanche_and_a_missing_one_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['avalanche'] = None\n"  # as if avalanche-lib were not installed, whatever this venv has
        "import mas_local, mas_local.integrations\n"
        "assert 'MASAvalanchePlugin' in dir(mas_local.integrations)\n"
        "assert not any(m == 'avalanche' or m.startswith('avalanche.') for m in sys.modules if sys.modules[m])\n"
        "try:\n"
        "    from mas_local.integrations import MASAvalanchePlugin\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    printed = run_python(code)
    assert "pip install 'mas-local[avalanche]'" in printed and "avalanche-lib" in printed
