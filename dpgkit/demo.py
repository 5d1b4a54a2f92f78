"""The offline demo: restore 8 held-out Fashion-MNIST images with the embedded prior.

    python -m dpgkit.demo [recipes/demo.yaml] [--out_dir DIR]

Three tasks (box inpainting, super-resolution x4, Gaussian deblurring; measurement noise
sigma_y = 0.05), each solved with DPS and DPG, with the `demo-fashion32` prior that ships in the
package (no network needed). Writes OUT_DIR/<task>/<method>/<name>.png, the comparison grid
OUT_DIR/grid.png (input | DPS | DPG | truth, PSNR under each) and OUT_DIR/summary.{md,json}
(mean PSNR of the degraded input, DPS and DPG per task). The same run as a recipe:
`dpgkit predict recipes/demo.yaml`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .io import save_png, to_uint8
from .models.base import DiffusionModel
from .noise import Gaussian
from .operators import GaussianBlur, Inpainting, SuperResolution
from .solvers import DPG, DPS
from .task import Task

__all__ = [
    "DEMO_IMAGES", "DEMO_SETTINGS", "degraded_view", "demo_images", "demo_tasks", "load_demo_prior",
    "psnr", "run_demo", "run_recipe", "sample_prior",
]

DEMO_IMAGES = Path(__file__).parent / "data" / "demo_fashion32"

# Solver settings tuned for the 32x32 demo prior (see recipes/demo.yaml); DDIM keeps it in CPU time.
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "inpaint_box": {"dps": {"scale": 0.1}, "dpg": {"scale": 0.6}},
    "sr_x4": {"dps": {"scale": 0.1}, "dpg": {"scale": 0.6}},
    "deblur_gauss": {"dps": {"scale": 0.05}, "dpg": {"scale": 0.6}},
}
DEMO_STEPS = 50
DEMO_NUM_SAMPLES = 200


def demo_images(folder: str | Path = DEMO_IMAGES) -> tuple[list[str], Tensor]:
    """The demo's held-out images: (names, x (8, 1, 32, 32) in [-1, 1])."""
    from PIL import Image

    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no demo images (*.png) in {folder}")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            arrays.append(np.asarray(im.convert("L"), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays))[:, None] / 127.5 - 1.0
    return [f.stem for f in files], x


def demo_tasks(sigma_y: float = 0.05) -> dict[str, Task]:
    """The three demo tasks at 32x32: a 14 px box hole, average-pool x4, Gaussian blur std 2."""
    noise = Gaussian(sigma_y)
    return {
        "inpaint_box": Task(Inpainting.box(side=14, margin=5), noise),
        "sr_x4": Task(SuperResolution(factor=4), noise),
        "deblur_gauss": Task(GaussianBlur(kernel_size=13, std=2.0), noise),
    }


def degraded_view(task: Task, y: Tensor, image_shape: Sequence[int]) -> Tensor:
    """The measurement shown as an image of `image_shape` (what "the degraded input" scores):
    the low-resolution image repeated back to full size for super-resolution, y otherwise."""
    h, w = image_shape[-2:]
    if y.shape[-2:] != (h, w):
        f = h // y.shape[-2]
        y = y.repeat_interleave(f, -2).repeat_interleave(w // y.shape[-1], -1)
    return y.clamp(-1, 1)


def psnr(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image PSNR (dB) of x against ref, both (B, C, H, W) in [-1, 1] (dpgkit.metrics, on [0, 1])."""
    from .metrics import psnr as psnr01

    return psnr01((x.clamp(-1, 1) + 1) / 2, (ref.clamp(-1, 1) + 1) / 2)


def _to_uint8(x: Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) uint8 (dpgkit.io's rounding)."""
    a = to_uint8(x)
    return a[:, :, 0] if a.shape[2] == 1 else a


def comparison_grid(
    names: Sequence[str], panels: dict[str, dict[str, Tensor]], scores: dict[str, dict[str, Tensor]],
    zoom: int = 3,
) -> Any:
    """A PIL image: one block per task (columns input | DPS | DPG | truth), one row per image,
    the PSNR (dB) under each restored or degraded image."""
    from PIL import Image, ImageDraw

    cols = ("input", "dps", "dpg", "truth")
    tasks = list(panels)
    _, _, h, w = next(iter(panels.values()))["truth"].shape
    cw, ch, text_h, head_h, gap = w * zoom, h * zoom, 14, 30, 12
    width = len(tasks) * (len(cols) * (cw + 2)) + (len(tasks) - 1) * gap + 4
    height = head_h + len(names) * (ch + text_h + 2) + 4
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for ti, task in enumerate(tasks):
        x0 = 2 + ti * (len(cols) * (cw + 2) + gap)
        draw.text((x0, 2), task, fill="black")
        for ci, col in enumerate(cols):
            draw.text((x0 + ci * (cw + 2) + 2, 16), col.upper() if col in ("dps", "dpg") else col, fill="black")
        for ri in range(len(names)):
            top = head_h + ri * (ch + text_h + 2)
            for ci, col in enumerate(cols):
                tile = Image.fromarray(_to_uint8(panels[task][col][ri])).convert("RGB")
                tile = tile.resize((cw, ch), Image.NEAREST)
                left = x0 + ci * (cw + 2)
                grid.paste(tile, (left, top))
                if col != "truth":
                    draw.text((left + 2, top + ch), f"{float(scores[task][col][ri]):.2f} dB", fill="black")
    return grid


@torch.no_grad()
def sample_prior(
    model: DiffusionModel, n: int, steps: int = 50, seed: int = 0, batch_size: int = 100,
    eta: float = 1.0, progress: bool = False,
) -> Tensor:
    """n unconditional samples (n, C, H, W) in [-1, 1]: DDIM over `steps` respaced steps (eta 1:
    ancestral noise), sample k drawn from its own generator seeded by (seed, k)."""
    from tqdm.auto import tqdm

    from .diffusion import at_step, ddim_step, tweedie_x0
    from .seeding import generator

    sched = model.schedule.respace(f"ddim{steps}")
    out = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="sampling"):
        ks = list(range(start, min(n, start + batch_size)))
        gens = [generator(seed, k, "sample") for k in ks]

        def draw(gens=gens) -> Tensor:
            return torch.stack([torch.randn(model.image_shape, generator=g) for g in gens])

        x = draw()
        for i in reversed(range(len(sched))):
            i_vec = torch.full((len(ks),), i, dtype=torch.long)
            t_vec = sched.timesteps[i_vec]
            eps = model.eps(x, t_vec)
            x0 = tweedie_x0(x, eps, at_step(sched.alphas_cumprod, i_vec, x))
            x = ddim_step(sched, i_vec, x, x0, eta=eta, noise=draw() if eta > 0 else None)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def load_demo_prior() -> DiffusionModel:
    """The embedded `demo-fashion32` prior (weights inside the package)."""
    from .models import registry

    preset = registry.PRESETS["demo-fashion32"]
    return registry.load("demo-fashion32", checkpoint=preset.checkpoint_name)


def run_demo(
    out_dir: str | Path,
    steps: int = DEMO_STEPS,
    num_samples: int = DEMO_NUM_SAMPLES,
    settings: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    model: DiffusionModel | None = None,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and write its outputs into `out_dir`; returns the summary.

    steps: DDIM steps of both solvers; num_samples: DPG's Monte Carlo N; settings: the per-task
    guidance scales (default `DEMO_SETTINGS`); model: another 1x32x32 prior (default the embedded one).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or DEMO_SETTINGS
    model = model or load_demo_prior()
    names, x = demo_images()
    all_tasks = demo_tasks()
    chosen = list(tasks) if tasks is not None else list(all_tasks)
    indices = list(range(len(names)))
    panels: dict[str, dict[str, Tensor]] = {}
    scores: dict[str, dict[str, Tensor]] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    bar = tqdm(total=2 * len(chosen), desc="demo", disable=not progress, file=sys.stderr)
    for name in chosen:
        task = all_tasks[name]
        y, task = task.measure(x, seed=seed, indices=indices)
        degraded = degraded_view(task, y, x.shape)
        panels[name] = {"input": degraded, "truth": x}
        scores[name] = {"input": psnr(degraded, x)}
        cfg = settings[name]
        solvers = {
            "dps": DPS(sampler="ddim", steps=steps, **cfg["dps"]),
            "dpg": DPG(sampler="ddim", steps=steps, num_samples=num_samples, **cfg["dpg"]),
        }
        for method, solver in solvers.items():
            bar.set_postfix_str(f"{name} {method.upper()}")
            t0 = time.perf_counter()
            x_hat = solver.restore(model, task, y, seed=seed, indices=indices, progress=progress)
            timings[f"{name}/{method}"] = time.perf_counter() - t0
            panels[name][method] = x_hat
            scores[name][method] = psnr(x_hat, x)
            for n, img in zip(names, x_hat):
                save_png(img, out / name / method / f"{n}.png")
            bar.update(1)
        for n, img, d in zip(names, x, degraded):
            save_png(d, out / name / "input" / f"{n}.png")
            save_png(img, out / name / "truth" / f"{n}.png")
    bar.close()
    comparison_grid(names, panels, scores).save(out / "grid.png")
    summary = {
        "out_dir": str(out),
        "tasks": {
            t: {k: float(v.mean()) for k, v in s.items()} for t, s in scores.items()
        },
        "per_image": {t: {k: [round(float(a), 3) for a in v] for k, v in s.items()} for t, s in scores.items()},
        "names": names,
        "steps": steps,
        "num_samples": num_samples,
        "settings": {t: settings[t] for t in chosen},
        "seconds": round(time.perf_counter() - start, 1),
        "seconds_per_run": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| task | input PSNR | DPS PSNR | DPG PSNR |", "| --- | --- | --- | --- |"]
    for t, s in summary["tasks"].items():
        lines.append(f"| {t} | {s['input']:.2f} | {s['dps']:.2f} | {s['dpg']:.2f} |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + f"\n\nmean over {len(names)} images, dB; {summary['seconds']} s\n")
    if progress:
        print(table, file=sys.stderr)
    return summary


def run_recipe(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the demo as a recipe file says (recipes/demo.yaml: `out_dir` and a `demo:` block with
    steps, num_samples, seed and the per-task solver settings)."""
    import yaml

    recipe = yaml.safe_load(Path(path).read_text()) or {}
    if "demo" not in recipe:
        raise ValueError(f"{path}: expected a `demo:` block (steps, num_samples, seed, settings)")
    cfg = dict(recipe["demo"])
    unknown = sorted(set(cfg) - {"steps", "num_samples", "seed", "settings", "tasks"})
    if unknown:
        raise ValueError(f"{path}: unknown keys in demo: {unknown}")
    out = out_dir or recipe.get("out_dir") or "demo_out"
    return run_demo(out, **cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dpgkit.demo [recipes/demo.yaml | OUT_DIR] [--out_dir DIR]`."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--out_dir" in args:
        k = args.index("--out_dir")
        out = args[k + 1]
        del args[k : k + 2]
    if args and args[0].endswith((".yaml", ".yml")):
        summary = run_recipe(args[0], out)
        out = out or summary["out_dir"]
    else:
        out = out or (args[0] if args else "demo_out")
        summary = run_demo(out)
    print(f"wrote {out}/grid.png and {out}/summary.md in {summary['seconds']} s")


if __name__ == "__main__":  # pragma: no cover
    main()
