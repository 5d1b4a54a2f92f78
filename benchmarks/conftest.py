"""pytest-benchmark suites live in bench_*.py files here (not collected by the test run).

    pytest benchmarks/bench_guidance.py --benchmark-enable                    # everything
    pytest benchmarks/bench_guidance.py --benchmark-enable -m "not large"     # skip N=5000, batch 4
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "large: N = 5000 or batch 4 (minutes and GBs on a CPU)")


def pytest_collect_file(parent, file_path):
    # files named on the command line are collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
