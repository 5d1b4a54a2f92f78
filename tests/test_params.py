"""Every solver parameter is checked when the solver is built; the message names the allowed range."""

from __future__ import annotations

import math

import pytest

from dpgkit.solvers import DDNM, DDRM, DPG, DPS, RedDiff

BAD = [
    (DPG, {"scale": -1.0}, "DPG scale must be a finite number > 0, got -1.0"),
    (DPG, {"scale": 0.0}, "DPG scale must be a finite number > 0, got 0.0"),
    (DPG, {"scale": math.nan}, "DPG scale must be a finite number > 0, got nan"),
    (DPG, {"scale": math.inf}, "DPG scale must be a finite number > 0, got inf"),
    (DPG, {"scale": 1.0, "num_samples": 1}, "DPG num_samples must be a whole number >= 2, got 1"),
    (DPG, {"scale": 1.0, "num_samples": 2.5}, "DPG num_samples must be a whole number >= 2, got 2.5"),
    (DPG, {"scale": 1.0, "momentum": 1.0}, "DPG momentum must be a finite number >= 0 and < 1, got 1.0"),
    (DPG, {"scale": 1.0, "r_min": -0.1}, "DPG r_min must be a finite number >= 0, got -0.1"),
    (DPG, {"scale": 1.0, "znorm": 0}, "DPG znorm must be a finite number > 0, got 0"),
    (DPG, {"scale": 1.0, "steps": 0}, "DPG steps must be a whole number >= 1, got 0"),
    (DPG, {"scale": 1.0, "chunk_size": 0}, "DPG chunk_size must be a whole number >= 1, got 0"),
    (DPG, {"scale": 1.0, "sampler": "ddmp"},
     "DPG sampler must be one of 'ddpm', 'ddim'; got 'ddmp' (did you mean 'ddpm'?)"),
    (DPG, {"scale": 1.0, "r": "tweedy"}, "DPG r must be one of 'heuristic', 'tweedie'; got 'tweedy'"),
    (DPG, {"scale": 1.0, "backend": "cuda"}, "DPG backend must be one of"),
    (DPG, {"scale": "160"}, "DPG scale must be a finite number > 0, got '160' (str)"),
    (DPS, {"scale": -0.5}, "DPS scale must be a finite number > 0, got -0.5"),
    (DPS, {"scale": 1.0, "steps": -3}, "DPS steps must be a whole number >= 1, got -3"),
    (DDRM, {"eta": 1.5}, "DDRM eta must be a finite number >= 0 and <= 1, got 1.5"),
    (DDRM, {"eta_b": -0.1}, "DDRM eta_b must be a finite number >= 0 and <= 1, got -0.1"),
    (DDRM, {"steps": 0}, "DDRM steps must be a whole number >= 1, got 0"),
    (DDNM, {"eta": -1.0}, "DDNM eta must be a finite number >= 0 and <= 1, got -1.0"),
    (DDNM, {"s_min": -1.0}, "DDNM s_min must be a finite number >= 0, got -1.0"),
    (RedDiff, {"lr": 0.0}, "RED-Diff lr must be a finite number > 0, got 0.0"),
    (RedDiff, {"lambda_": -0.25}, "RED-Diff lambda_ must be a finite number >= 0, got -0.25"),
    (RedDiff, {"weighting": "linaer"}, "(did you mean 'linear'?)"),
]


@pytest.mark.parametrize(("solver", "kwargs", "message"), BAD, ids=[f"{s.__name__}-{k}" for s, k, _ in BAD])
def test_invalid_parameters_are_refused_with_the_allowed_range(solver, kwargs, message):
    with pytest.raises(ValueError) as err:
        solver(**kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_parameters_are_kept():
    dpg = DPG(scale=160, num_samples=500, momentum=0.1, r_min=0.05, znorm=196608)
    assert (dpg.scale, dpg.num_samples, dpg.momentum, dpg.r_min, dpg.znorm) == (160.0, 500, 0.1, 0.05, 196608.0)
    assert isinstance(dpg.num_samples, int) and isinstance(dpg.scale, float)


@pytest.mark.parametrize(("solver", "label"), [
    (DPG(scale=1.0), "DPG DDPM"), (DPG(scale=1.0, sampler="ddim"), "DPG DDIM"), (DPS(), "DPS"),
    (DPS(sampler="ddim"), "DPS DDIM"), (DDRM(), "DDRM"), (DDNM(), "DDNM+"), (DDNM(plus=False), "DDNM"),
    (RedDiff(), "RED-Diff")])
def test_labels_come_from_the_solver_that_runs(solver, label):
    assert solver.label == label
