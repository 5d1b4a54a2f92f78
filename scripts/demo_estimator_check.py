"""The offline demo's tasks (recipes/demo.yaml) solved by DPG with the published and the
Rao-Blackwellized estimator: the numbers behind the demo's estimator setting (README, "The estimator").

The demo's settings: the 8 shipped Fashion-MNIST images, the embedded prior demo-fashion32, Gaussian
noise sigma_y 0.05, DDPM with 80 respaced steps, DPG scale 10 and N = 200; here N in {200 published,
50 and 200 Rao-Blackwellized}, seed 0, mean PSNR (dB) over the 8 images. The measurement and the
solver are seeded through `Task.measure` and `restore` (not the predict pipeline), so the published
row may differ slightly from the demo's own summary; both estimators see the same y and seeds.

    python scripts/demo_estimator_check.py sr_x4,inpaint_box [--scales 10] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dpgkit import Task, io
from dpgkit.metrics import psnr
from dpgkit.models import registry
from dpgkit.noise import Gaussian
from dpgkit.operators import GaussianBlur, Inpainting, SuperResolution
from dpgkit.solvers import DPG

OPERATORS = {
    "inpaint_box": lambda: Inpainting.box(side=14, margin=5),
    "sr_x4": lambda: SuperResolution(factor=4),
    "deblur_gauss": lambda: GaussianBlur(kernel_size=13, std=2.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", help="comma-separated: inpaint_box, sr_x4, deblur_gauss")
    parser.add_argument("--scales", default="10", help="comma-separated DPG scales (the demo's: 10)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = registry.load("demo-fashion32", checkpoint="demo-fashion32.safetensors")
    files = sorted(io.resolve_path("pkg://dpgkit/data/demo_fashion32").glob("*.png"))
    x = torch.stack([io.load_image(f, channels=1)[0] for f in files])
    indices = list(range(len(files)))
    out = {}
    for name in args.tasks.split(","):
        y, drawn = Task(OPERATORS[name](), Gaussian(0.05)).measure(x, seed=0, indices=indices)
        for estimator, n in (("published", 200), ("rao-blackwell", 50), ("rao-blackwell", 200)):
            for scale in (float(s) for s in args.scales.split(",")):
                start = time.perf_counter()
                solver = DPG(scale=scale, sampler="ddpm", steps=80, num_samples=n, estimator=estimator)
                x_hat = solver.restore(model, drawn, y, seed=0, indices=indices, progress=False)
                score = psnr((x_hat.clamp(-1, 1) + 1) / 2, (x + 1) / 2).mean()
                key = f"{name}/{estimator}/N{n}/s{scale:g}"
                out[key] = {"psnr": round(float(score), 3), "seconds": round(time.perf_counter() - start, 1)}
                print(key, out[key], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
