"""The CPU-side parts of benchmarks/gpu_check.py run here (Triton's interpreter, tiny sizes), so the
GPU check cannot rot unnoticed on machines without a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_check", BENCH / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_rb_direction_checks_and_goals_run_on_this_device():
    gc = _gpu_check()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = gc.check_rb_directions(budget=1e9, size=12, num_samples=37, fast_math=(False,), device=device)
    assert len(results) == 5 * 2 + 1
    assert all(entry["ok"] for entry in results.values()), results
    goals = gc.goals({"timings": {"rb-triton/N5000/B1": {"median_s": 0.01}, "chunked/N5000/B1": {"median_s": 1.0},
                                  "triton/N5000/B1": {"median_s": 0.05}},
                      "adm": {"float32/forward_vjp": {"median_s": 0.2}}})
    assert goals["rb_fused_speedup_over_chunked_N5000"] == 100.0
    assert goals["rb_fused_speedup_over_fused_N5000"] == 5.0
    assert abs(goals["rb_fused_N5000_over_forward_vjp_float32"] - 0.05) < 1e-12
