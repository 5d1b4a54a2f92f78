"""The offline demo's tasks solved by DPG with the published and the Rao-Blackwellized estimator.

Mean PSNR over the 8 shipped images (embedded prior demo-fashion32, DDIM 50 steps, sigma_y 0.05,
seed 0) for N in {200 published, 50 and 200 Rao-Blackwellized} at scales {0.6, 1.0}: the numbers
behind the demo's estimator setting (README, "The estimator").

    python scripts/demo_estimator_check.py sr_x4,inpaint_box [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dpgkit import demo
from dpgkit.solvers import DPG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", help="comma-separated demo task names (sr_x4, inpaint_box, deblur_gauss)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = demo.load_demo_prior()
    names, x = demo.demo_images()
    tasks = demo.demo_tasks()
    indices = list(range(len(names)))
    out = {}
    for name in args.tasks.split(","):
        y, drawn = tasks[name].measure(x, seed=0, indices=indices)
        for estimator, n in (("published", 200), ("rao-blackwell", 50), ("rao-blackwell", 200)):
            for scale in (0.6, 1.0):
                start = time.perf_counter()
                solver = DPG(scale=scale, sampler="ddim", steps=50, num_samples=n, estimator=estimator)
                x_hat = solver.restore(model, drawn, y, seed=0, indices=indices, progress=False)
                key = f"{name}/{estimator}/N{n}/s{scale}"
                out[key] = {"psnr": round(float(demo.psnr(x_hat, x).mean()), 3),
                            "seconds": round(time.perf_counter() - start, 1)}
                print(key, out[key], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
