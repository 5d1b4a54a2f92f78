"""FID of the embedded demo prior: N samples vs N held-out Fashion-MNIST test images.

Next to it, two references on the same real set: other held-out test images (the floor at this N)
and those images blurred (a known-bad reference). Prints a markdown table and writes JSON.

    python scripts/demo_prior_fid.py --n 1000 --out /tmp/demo_fid.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dpgkit.lightning.training_data import load_fashion_mnist
from dpgkit.metrics import FID
from dpgkit.models import load, sample_prior
from dpgkit.operators import GaussianBlur


def features(fid: FID, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    """FID Inception features of (N, 1, H, W) images in [-1, 1] (gray repeated to RGB, [0, 1])."""
    with torch.no_grad():
        return torch.cat([fid.inception(((images[s : s + batch] + 1) / 2).clamp(0, 1).repeat(1, 3, 1, 1))
                          for s in range(0, len(images), batch)])


def frechet(fid: FID, real: torch.Tensor, fake: torch.Tensor) -> float:
    fid.reset()
    fid.update(None, real=True, features=real)
    fid.update(None, real=False, features=fake)
    return float(fid.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="demo_fid.json")
    args = parser.parse_args()
    n, start = args.n, time.time()
    test = load_fashion_mnist(split="test", limit=1000 + 2 * n)
    real, other = test[1000 : 1000 + n], test[1000 + n : 1000 + 2 * n]
    blurred = GaussianBlur(kernel_size=13, std=2.0)(other)
    prior = load("demo-fashion32", checkpoint="demo-fashion32.safetensors")
    samples = sample_prior(prior, n, steps=args.steps, seed=1, progress=True)
    fid = FID()
    f_real, f_other, f_blur, f_samples = (features(fid, x) for x in (real, other, blurred, samples))
    result = {
        "n": n, "steps": args.steps,
        "other held-out test images (floor)": frechet(fid, f_real, f_other),
        "samples of the prior": frechet(fid, f_real, f_samples),
        "blurred test images (known-bad)": frechet(fid, f_real, f_blur),
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
