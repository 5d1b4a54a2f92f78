"""The kernel tests run the Triton kernels through Triton's interpreter when there is no GPU.

Triton chooses between compiling and interpreting when a kernel is decorated, and for its own
library (tl.philox) when `triton` is first imported, so TRITON_INTERPRET must be set before
anything imports triton. This file sets it when no CUDA device is present and triton is not
imported yet (pytest loads it before collecting the test modules beside it, and triton has no
other use on a CPU-only machine). On a GPU the kernels are compiled and the tests use CUDA.

If something imported triton first (another test module, a plugin, an explicit file order), the
tests here cannot run in this process: they are then run once in a fresh interpreter process
with TRITON_INTERPRET=1, and each test reports the outcome it had there.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

_OUTCOMES_ENV = "DPGKIT_KERNEL_TEST_OUTCOMES"
HERE = Path(__file__).resolve().parent
# the test modules here import their shared cases (kernel_cases.py) by name, whatever import mode
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def kernel_device() -> torch.device:
    """Where the kernel tests put their tensors: CUDA when present, else the CPU (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def _runs_here() -> bool:
    from dpgkit.kernels import triton_dpg

    return triton_dpg.usable_on(kernel_device()) is None


_selected: list[str] = []


def pytest_collection_finish(session):
    """Remember which of the tests here were selected, for the fresh process."""
    _selected[:] = [item.nodeid for item in session.items if HERE in Path(str(item.path)).parents]


@functools.cache
def _fresh_process_outcomes(rootdir: str) -> dict[str, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "outcomes.jsonl"
        env = {**os.environ, "TRITON_INTERPRET": "1", _OUTCOMES_ENV: str(record)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(_selected or [str(HERE)])]
        proc = subprocess.run(cmd, cwd=rootdir, env=env, capture_output=True, text=True, timeout=1200)
        if not record.exists():
            raise RuntimeError(f"the kernel tests did not run in a fresh process:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        outcomes: dict[str, dict] = {}
        for line in record.read_text().splitlines():
            entry = json.loads(line)
            if entry["outcome"] != "passed" or entry["nodeid"] not in outcomes:
                outcomes[entry["nodeid"]] = entry
        return outcomes


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if _runs_here():
        return None
    entry = _fresh_process_outcomes(str(pyfuncitem.config.rootpath)).get(pyfuncitem.nodeid)
    if entry is None:
        pytest.fail(f"{pyfuncitem.nodeid} did not run in the fresh interpreter process", pytrace=False)
    if entry["outcome"] != "passed":
        pytest.fail(f"failed in a fresh TRITON_INTERPRET=1 process:\n{entry['longrepr']}", pytrace=False)
    return True


def pytest_runtest_logreport(report):
    """In the fresh process: record each test's outcome for the parent to read."""
    path = os.environ.get(_OUTCOMES_ENV)
    if path and (report.when == "call" or report.outcome != "passed"):
        with open(path, "a") as f:
            f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome,
                                "longrepr": str(report.longrepr or "")}) + "\n")
