"""pytest plugin used by ``bench/gpu_check.sh`` (``-p bench.pytest_gpu_check``).

* ``MAS_LOCAL_TEST_TIMEOUT=<seconds>``: a per-test time limit (setup, call and teardown;
  ``SIGALRM``, so code stuck inside one C call is only stopped by the step's own
  ``timeout``). A test past its limit fails with :class:`TestTimeout`.
* ``MAS_LOCAL_REQUIRE_CUDA=1``: the session fails unless at least one ``cuda``-marked test
  passed, and a ``cuda``-marked test skipped because a backend is missing on the GPU
  (for instance an extension built without CUDA kernels) counts as a failure: on the
  GPU machine those skips mean the check did not check anything.
* ``MAS_LOCAL_EXPECT_PACKAGE=<dir>``: the session stops at once unless ``mas_local`` and
  ``mas_local.kernels`` are imported from under ``<dir>`` (the staged copy), so a
  checkout on ``sys.path`` cannot silently shadow what was built.

The terminal summary ends with one line per outcome of the ``cuda``-marked tests.
"""

from __future__ import annotations

import collections
import os
import signal

import pytest

TIMEOUT = float(os.environ.get("MAS_LOCAL_TEST_TIMEOUT", "0") or 0)
REQUIRE_CUDA = os.environ.get("MAS_LOCAL_REQUIRE_CUDA", "0") == "1"
EXPECT_PACKAGE = os.environ.get("MAS_LOCAL_EXPECT_PACKAGE", "")
#: Skip reasons of cuda-marked tests that mean "the GPU build is incomplete", not "not applicable here".
FATAL_SKIPS = ("unavailable on cuda", "built without CUDA", "no CUDA device", "needs a CUDA GPU", "is not built")


class TestTimeout(Exception):
    """A test ran past ``MAS_LOCAL_TEST_TIMEOUT``."""


_outcomes: collections.Counter = collections.Counter()
_skips: collections.Counter = collections.Counter()
_fatal: list[str] = []


def pytest_sessionstart(session):
    if not EXPECT_PACKAGE:
        return
    import mas_local

    where = {"mas_local": os.path.dirname(mas_local.__file__)}
    try:
        import mas_local.kernels as kernels

        where["mas_local.kernels"] = os.path.dirname(kernels.__file__)
    except ImportError as exc:
        pytest.exit(f"gpu check: mas_local.kernels cannot be imported ({exc})", returncode=3)
    expected = os.path.realpath(EXPECT_PACKAGE)
    wrong = {k: v for k, v in where.items() if not os.path.realpath(v).startswith(expected + os.sep)}
    if wrong:
        pytest.exit(f"gpu check: imported from outside {expected}: {wrong}", returncode=3)


def pytest_report_header(config):
    import importlib.util

    spec = importlib.util.find_spec("mas_local")  # where it would be imported from, without importing torch
    where = os.path.dirname(spec.origin) if spec and spec.origin else "(not importable)"
    return f"mas_local from {where}; per-test limit {TIMEOUT or 'none'} s"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past its {TIMEOUT:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def pytest_runtest_logreport(report):
    if "cuda" not in report.keywords:
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _outcomes["skipped"] += 1
        _skips[reason] += 1
        if any(s in reason for s in FATAL_SKIPS):
            _fatal.append(f"{report.nodeid}: {reason}")
    elif report.failed:
        _outcomes["failed"] += 1
    elif report.when == "call" and report.passed:
        _outcomes["passed"] += 1


def _problems() -> list[str]:
    problems = []
    if REQUIRE_CUDA and _outcomes["passed"] == 0:
        problems.append("no cuda-marked test passed")
    if REQUIRE_CUDA and _fatal:
        problems.append(f"{len(_fatal)} cuda-marked tests skipped for a missing GPU backend")
    return problems


def pytest_sessionfinish(session, exitstatus):
    if _problems() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.write_line(
        f"cuda-marked tests: {_outcomes['passed']} passed, {_outcomes['failed']} failed, {_outcomes['skipped']} skipped"
    )
    for reason, count in _skips.most_common(5):
        tr.write_line(f"  skipped {count}x: {reason}")
    for line in _fatal[:10]:
        tr.write_line(f"  missing on the GPU: {line}")
    for problem in _problems():
        tr.write_line(f"GPU CHECK FAILED: {problem}")
