"""A pytest plugin for the GPU call: every failure is written to a file the moment it happens.

    LIVE_FAILURES=$OUT/failures.txt python -m pytest -p benchmarks.live_failures -n 8 tests/

The GPU call's stages are killed at their time cap, and pytest (with xdist above all) prints its
failures only at the end of the session: a killed session would name none. This file keeps the
node id, the duration and the traceback of each failure, and a last line per finished session.
"""
from __future__ import annotations

import os
import time

import pytest

_started = time.time()


def _path(config: pytest.Config) -> str | None:
    # Under xdist the controller receives every worker's reports: write from it alone.
    return None if hasattr(config, "workerinput") else os.environ.get("LIVE_FAILURES")


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()


_STATE: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    _STATE["path"] = _path(config)
    if _STATE["path"]:
        _append(_STATE["path"], f"# session started {time.strftime('%H:%M:%S')}\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _STATE.get("path")
    if path and report.failed:
        _append(path, f"\n=== FAILED {report.nodeid} ({report.when}, {report.duration:.1f} s, "
                      f"t+{time.time() - _started:.0f} s)\n{report.longreprtext}\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = _STATE.get("path")
    if path:
        _append(path, f"\n# session finished: exit status {exitstatus}, {time.time() - _started:.0f} s\n")
