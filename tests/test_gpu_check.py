"""bench/gpu_check.sh and its pytest plugin, on CPU: the script stops at once, with a clear message, on a
machine without a GPU; the plugin limits each test's time and fails a session in which no CUDA test passed
or a CUDA test skipped because a GPU backend is missing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES = """
import time
import pytest

@pytest.mark.cuda
def test_gpu_thing():
    {body}

def test_plain():
    {plain}
"""


def _run_plugin(tmp_path, body="pass", plain="pass", **env):
    (tmp_path / "test_case.py").write_text(CASES.format(body=body, plain=plain))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n")
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    for key in ("MAS_LOCAL_TEST_TIMEOUT", "MAS_LOCAL_REQUIRE_CUDA", "MAS_LOCAL_EXPECT_PACKAGE"):
        full_env.setdefault(key, "")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "bench.pytest_gpu_check",
        "--rootdir",
        str(tmp_path),
        str(tmp_path / "test_case.py"),
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)


def test_plugin_passes_when_a_cuda_test_passed(tmp_path):
    out = _run_plugin(tmp_path, MAS_LOCAL_REQUIRE_CUDA="1")
    assert out.returncode == 0, out.stdout
    assert "cuda-marked tests: 1 passed, 0 failed, 0 skipped" in out.stdout


def test_plugin_fails_when_every_cuda_test_skipped(tmp_path):
    out = _run_plugin(
        tmp_path, body="pytest.skip('mas_local._C was built without CUDA kernels')", MAS_LOCAL_REQUIRE_CUDA="1"
    )
    assert out.returncode == 1, out.stdout
    assert "GPU CHECK FAILED: no cuda-marked test passed" in out.stdout
    assert "missing on the GPU" in out.stdout and "built without CUDA" in out.stdout
    relaxed = _run_plugin(tmp_path, body="pytest.skip('mas_local._C was built without CUDA kernels')")
    assert relaxed.returncode == 0, relaxed.stdout  # without MAS_LOCAL_REQUIRE_CUDA a skip is a skip


def test_plugin_stops_a_test_past_its_time_limit(tmp_path):
    out = _run_plugin(tmp_path, plain="time.sleep(30)", MAS_LOCAL_TEST_TIMEOUT="1")
    assert out.returncode == 1, out.stdout
    assert "TestTimeout" in out.stdout and "ran past its 1 s limit" in out.stdout


def test_plugin_refuses_a_shadowed_package(tmp_path):
    out = _run_plugin(tmp_path, MAS_LOCAL_EXPECT_PACKAGE=str(tmp_path))
    assert out.returncode == 3, out.stdout + out.stderr
    assert "imported from outside" in out.stdout + out.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="bash script")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run for minutes")
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("MAS_LOCAL_CHECK_DRY_RUN", None)
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no CUDA device visible to torch" in out.stdout
    assert "preflight     FAILED" in out.stdout and "(no table" in out.stdout
    assert (tmp_path / "gpu_check.log").exists()
