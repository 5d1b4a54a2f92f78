"""Rao-Blackwellized vs published DPG direction, with enough states to see past Monte Carlo noise.

The exact benchmark (benchmarks/exact_posterior.py) averages cosines over 64 states, whose standard
error (about 0.006) is as large as some RB-vs-plain gaps it reports. This check repeats the two
comparisons of issue 15 on the inpainting and SR problems (D = 64, m/D = 1/4) with 4 x 128 states:
RB at N = 100 against plain DPG at N = 300, and both at N = 1000. It prints a markdown table of
the mean cosine gap (RB - plain) per timestep with its standard error, and writes
benchmarks/results/rb-cosines.json.

Run: python benchmarks/rb_cosine_check.py   (about a minute on one CPU thread)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dpgkit import validation as V
from dpgkit.solvers import DPG

TIMESTEPS = [999, 800, 600, 400, 200, 100, 50, 10]
SEEDS, STATES = 4, 128
PAIRS = {"RB N=100 - plain N=300": (100, 300), "RB N=1000 - plain N=1000": (1000, 1000)}


def gap(problem: V.Problem, n_rb: int, n_plain: int) -> tuple[list[float], list[float]]:
    """Mean over SEEDS x STATES states of cos(RB) - cos(plain) per timestep, and its standard error."""
    per_seed = []
    for seed in range(SEEDS):
        rb = V.solver_direction(DPG(scale=1.0, num_samples=n_rb, estimator="rao-blackwell"), seed=seed)
        plain = V.solver_direction(DPG(scale=1.0, num_samples=n_plain), seed=seed)
        a = V.guidance_cosines(problem, rb, TIMESTEPS, num_states=STATES, seed=seed)
        b = V.guidance_cosines(problem, plain, TIMESTEPS, num_states=STATES, seed=seed)
        per_seed.append([x - y for x, y in zip(a, b)])
    d = torch.tensor(per_seed, dtype=torch.float64)
    return d.mean(0).tolist(), (d.std(0) / SEEDS**0.5).tolist()


def main() -> None:
    torch.set_num_threads(1)
    start, results, lines = time.time(), {}, []
    lines.append("| problem | comparison | " + " | ".join(f"t={t}" for t in TIMESTEPS) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in TIMESTEPS) + " |")
    for kind in ("inpainting", "sr"):
        for sigma in (0.05, 0.2):
            problem = V.make_problem(kind, sigma, (1, 8, 8), seed=0, num_components=4)
            for label, (n_rb, n_plain) in PAIRS.items():
                mean, se = gap(problem, n_rb, n_plain)
                results[f"{problem.name} | {label}"] = {"timesteps": TIMESTEPS, "gap": mean, "se": se}
                cells = " | ".join(f"{m:+.3f} ({s:.3f})" for m, s in zip(mean, se))
                lines.append(f"| {problem.name} | {label} | {cells} |")
    print("\n".join(lines))
    out = Path(__file__).parent / "results" / "rb-cosines.json"
    out.write_text(json.dumps({"states": SEEDS * STATES, "seconds": round(time.time() - start, 1),
                               "results": results}, indent=1) + "\n")
    print(f"\n{time.time() - start:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
