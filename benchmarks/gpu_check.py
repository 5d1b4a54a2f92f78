"""The GPU check of the fused guidance kernels (run through gpu_check.sh on a CUDA machine).

1. correctness on the GPU: the kernels' noise against the Philox definition, and the fused
   direction against the torch reference fed the kernels' own noise, for every fused operator and
   both noise models, accurate and fast math; the same bits twice;
2. timings at D = 3 x 256 x 256 (SR x4, Gaussian noise): eager, chunked and fused, N = 500 and
   5000, batch 1 and 4, with peak memory; a few launch configs of the fused kernels;
3. the ADM ImageNet 256 preset (random weights), fp32 and bf16: one network forward + VJP, and one
   full DPG step (chunked and triton guidance);
4. the goals: fused >= 10x faster than eager at N = 5000, fused under 10% of forward + VJP;
5. the Rao-Blackwellized estimator (estimator="rao-blackwell"): its fused kernels (kernels.triton_rb)
   against its torch reference on the same noise (masks, average pooling, channel means, both
   noise models, accurate and fast math, per-item masks through the dispatcher), its timings
   beside the others' (rb-triton, rb-chunked) and one DPG step of the ADM preset with it.

`check_rb_directions` and `goals` also run on the CPU (Triton's interpreter, tiny sizes): see
tests/kernels/test_gpu_check_cpu.py.

Writes benchmarks/results/<gpu-name>.json (and a copy under $OUT when set). Every part runs
against a deadline (--budget seconds) and records what it skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guidance_cases as G  # noqa: E402

import dpgkit as dk  # noqa: E402
from dpgkit import kernels  # noqa: E402
from dpgkit.kernels import rao_blackwell, reference, triton_dpg, triton_rb  # noqa: E402
from dpgkit.kernels.fusion import plan_for  # noqa: E402
from dpgkit.kernels.philox import philox_normal  # noqa: E402

DEV = torch.device("cuda")
START = time.monotonic()


class OutOfTime(Exception):
    pass


def left(budget: float) -> float:
    return budget - (time.monotonic() - START)


def need(budget: float, seconds: float) -> None:
    if left(budget) < seconds:
        raise OutOfTime(f"less than {seconds:.0f} s left of the budget")


def sync_time(fn, rounds: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"median_s": sorted(times)[len(times) // 2], "min_s": min(times), "rounds": rounds}


def check_noise(num_samples: int = 257, numel: int = 70001, fast_math=(False, True)) -> dict:
    out = {}
    for fast in fast_math:
        cfg = triton_dpg.FusedConfig(fast_math=fast)
        worst = 0.0
        for seed in (0, 2**62 + 7, 2**64 - 1):
            eps = triton_dpg.philox_normal_triton(seed, 3, num_samples, numel, DEV, cfg)
            worst = max(worst, float((eps - philox_normal(seed, 3, num_samples, numel, DEV)).abs().max()))
        out[f"max_abs_diff_fast_math_{fast}"] = worst
    return out


def fused_operators(size: int, g: torch.Generator) -> dict:
    """Every operator kind the fused kernels run, for size x size images (the random mask drawn from `g`)."""
    return {
        "denoising": dk.operators.Denoising(),
        "sr4": dk.operators.SuperResolution(4),
        "sr3": dk.operators.SuperResolution(3),
        "colorization": dk.operators.Colorization(),
        "inpainting_random": dk.operators.Inpainting((torch.rand(1, 1, size, size, generator=g) > 0.92).float()),
        "uncrop": dk.operators.Inpainting.uncrop((size, size)),
    }


def check_directions(budget: float, size: int = 96, num_samples: int = 1001, fast_math=(False, True)) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (3, size, size)
    ops = fused_operators(size, g)
    results = {}
    for name, op in ops.items():
        for noise in (dk.noise.Gaussian(0.05), dk.noise.Poisson(1.0)):
            for fast in fast_math:
                need(budget, 20)
                cfg = triton_dpg.FusedConfig(fast_math=fast)
                x0hat, y, op_d, _, r, z, z_raw = G.problem(1, DEV, shape=shape, operator=op, noise=noise)
                plan = plan_for(op_d, shape, DEV)
                args = (r[0], z[0], z_raw[0], num_samples, 77)
                v, m = triton_dpg.dpg_direction_fused(x0hat[0], y[0], plan, noise, *args, config=cfg)
                v2, m2 = triton_dpg.dpg_direction_fused(x0hat[0], y[0], plan, noise, *args, config=cfg)

                def stream(seed, start, n, numel, device, cfg=cfg):
                    return triton_dpg.philox_normal_triton(seed, start, n, numel, device, cfg)

                v_ref, m_ref = reference.dpg_direction_eager(x0hat[0], y[0], op_d, noise, *args, stream=stream)
                scale = float(v_ref.abs().max())
                err = float((v - v_ref).abs().max()) / scale
                results[f"{name}/{type(noise).__name__}/fast_math={fast}"] = {
                    "max_abs_err_over_max": err, "m_abs_err": abs(float(m - m_ref)),
                    "same_bits_twice": bool(torch.equal(v, v2) and torch.equal(m, m2)),
                    "ok": err < 1e-3 and abs(float(m - m_ref)) < 1e-4 and bool(torch.equal(v, v2)),
                }
    # the dispatcher, batch 2 with per-item masks
    masks = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()
    x0hat, y, op_d, noise, r, z, z_raw = G.problem(2, DEV, shape=shape, operator=dk.operators.Inpainting(masks))
    v, m = kernels.dpg_direction(x0hat, y, op_d, noise, r, z, z_raw, 300, [1, 2], backend="triton")
    worst = 0.0
    for b in range(2):
        v_ref, _ = reference.dpg_direction_eager(x0hat[b], y[b], op_d.item(b), noise, r[b], z[b], z_raw[b], 300,
                                                 [1, 2][b], stream=triton_dpg.philox_normal_triton)
        worst = max(worst, float((v[b] - v_ref).abs().max() / v_ref.abs().max()))
    results["dispatch_batch2_inpainting"] = {"max_abs_err_over_max": worst, "ok": worst < 1e-3}
    return results


def check_rb_directions(budget: float, size: int = 96, num_samples: int = 1001, fast_math=(False, True),
                        device: torch.device = DEV) -> dict:
    """The fused Rao-Blackwellized direction against `rao_blackwell.rb_direction_eager` fed the
    kernels' own noise (m coordinates per sample), for every diagonal row space."""
    g = torch.Generator().manual_seed(1)
    shape = (3, size, size)
    # denoising's row space is the whole space: RB runs the published kernels there
    ops = {k: v for k, v in fused_operators(size, g).items() if k != "denoising"}
    results = {}
    for name, op in ops.items():
        for noise in (dk.noise.Gaussian(0.05), dk.noise.Poisson(1.0)):
            for fast in fast_math:
                need(budget, 20)
                cfg = triton_dpg.FusedConfig(fast_math=fast) if device.type == "cuda" else triton_dpg.DEFAULT_CONFIG
                x0hat, y, op_d, _, r, z, z_raw = G.problem(1, device, shape=shape, operator=op, noise=noise)
                space = rao_blackwell.row_space_of(op_d, x0hat[0])
                args = (r[0], z[0], z_raw[0], num_samples, 77)
                v, m = triton_rb.rb_direction_fused(x0hat[0], y[0], op_d, space, noise, *args, config=cfg)
                v2, m2 = triton_rb.rb_direction_fused(x0hat[0], y[0], op_d, space, noise, *args, config=cfg)

                def stream(seed, start, n, numel, dev, cfg=cfg):
                    return triton_dpg.philox_normal_triton(seed, start, n, numel, dev, cfg)

                v_ref, m_ref = rao_blackwell.rb_direction_eager(x0hat[0], y[0], op_d, noise, *args, space=space,
                                                                stream=stream)
                err = float((v - v_ref).abs().max()) / float(v_ref.abs().max())
                results[f"{name}/{type(noise).__name__}/fast_math={fast}"] = {
                    "rank": space.rank, "max_abs_err_over_max": err, "m_abs_err": abs(float(m - m_ref)),
                    "same_bits_twice": bool(torch.equal(v, v2) and torch.equal(m, m2)),
                    "ok": err < 1e-3 and abs(float(m - m_ref)) < 1e-4 and bool(torch.equal(v, v2)),
                }
    masks = (torch.rand(2, 1, size, size, generator=g) > 0.5).float()
    x0hat, y, op_d, noise, r, z, z_raw = G.problem(2, device, shape=shape, operator=dk.operators.Inpainting(masks))
    v, m = kernels.dpg_direction(x0hat, y, op_d, noise, r, z, z_raw, 300, [1, 2], backend="triton",
                                 estimator="rao-blackwell")
    worst = 0.0
    for b in range(2):
        v_ref, _ = rao_blackwell.rb_direction_eager(x0hat[b], y[b], op_d.item(b), noise, r[b], z[b], z_raw[b], 300,
                                                    [1, 2][b], stream=triton_dpg.philox_normal_triton)
        worst = max(worst, float((v[b] - v_ref).abs().max() / v_ref.abs().max()))
    results["dispatch_batch2_inpainting"] = {"max_abs_err_over_max": worst, "ok": worst < 1e-3}
    return results


def time_directions(budget: float) -> dict:
    out = {}
    for num_samples in (500, 5000):
        for batch in (1, 4):
            for backend in ("triton", "chunked", "eager"):
                key = f"{backend}/N{num_samples}/B{batch}"
                try:
                    need(budget, 60)
                    fn = G.direction_fn(backend, num_samples, batch, DEV)
                    peak = G.peak_memory_mb(fn, DEV)
                    rounds = 10 if backend == "triton" else 3
                    out[key] = {**sync_time(fn, rounds), "peak_mib": round(peak, 1)}
                except torch.cuda.OutOfMemoryError as err:
                    out[key] = {"error": f"out of memory: {str(err)[:200]}"}
                    torch.cuda.empty_cache()
                print(key, out[key], flush=True)
            for backend in ("triton", "chunked"):  # the Rao-Blackwellized estimator
                key = f"rb-{backend}/N{num_samples}/B{batch}"
                try:
                    need(budget, 30)
                    fn = G.direction_fn(backend, num_samples, batch, DEV, chunk_size=256, estimator="rao-blackwell")
                    peak = G.peak_memory_mb(fn, DEV)
                    out[key] = {**sync_time(fn, 10), "peak_mib": round(peak, 1)}
                except torch.cuda.OutOfMemoryError as err:
                    out[key] = {"error": f"out of memory: {str(err)[:200]}"}
                    torch.cuda.empty_cache()
                print(key, out[key], flush=True)
    return out


def time_fused_configs(budget: float) -> dict:
    out = {}
    x0hat, y, op, noise, r, z, z_raw = G.problem(1, DEV)
    plan = plan_for(op, x0hat.shape[1:], DEV)
    configs = {
        "default": triton_dpg.DEFAULT_CONFIG,
        "accurate_math": triton_dpg.FusedConfig(fast_math=False),
        "8x256": triton_dpg.FusedConfig(energy_block=(8, 256), combine_block=(8, 256), fast_math=True),
        "4x256": triton_dpg.FusedConfig(energy_block=(4, 256), combine_block=(4, 256), fast_math=True),
        "16x128_w8": triton_dpg.FusedConfig(num_warps=8, fast_math=True),
        "32x128_w8": triton_dpg.FusedConfig(energy_block=(32, 128), combine_block=(32, 128), num_warps=8,
                                            fast_math=True),
    }
    for name, cfg in configs.items():
        need(budget, 30)

        def run(cfg=cfg):
            return triton_dpg.dpg_direction_fused(x0hat[0], y[0], plan, noise, r[0], z[0], z_raw[0], 5000, 3,
                                                  config=cfg)

        out[name] = {**sync_time(run, 10), "config": repr(cfg)}
        print("config", name, out[name]["median_s"], flush=True)
    return out


def time_adm(budget: float) -> dict:
    from dpgkit.solvers.dpg import DPG

    out = {}
    need(budget, 90)
    t = time.perf_counter()
    model = dk.models.load("adm-imagenet256", device=DEV)
    out["load_s"] = time.perf_counter() - t
    x = torch.randn(1, 3, 256, 256, device=DEV)
    ts = torch.full((1,), 500, device=DEV, dtype=torch.long)
    y = G.problem(1, DEV)[1]
    task = dk.Task(dk.operators.SuperResolution(4), dk.noise.Gaussian(0.05))
    task.operator.to(DEV)
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).removeprefix("torch.")
        model.dtype = dtype if dtype != torch.float32 else None
        need(budget, 45)

        def fwd_vjp():
            xt = x.detach().requires_grad_(True)
            with torch.enable_grad():
                eps = model.eps(xt, ts)
                (g,) = torch.autograd.grad(eps, xt, grad_outputs=torch.ones_like(eps))
            return g

        torch.cuda.reset_peak_memory_stats()
        out[f"{dname}/forward_vjp"] = {**sync_time(fwd_vjp, 5), "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        print(dname, "forward+vjp", out[f"{dname}/forward_vjp"], flush=True)
        for backend, estimator in (("triton", "published"), ("chunked", "published"), ("triton", "rao-blackwell")):
            for num_samples in (500, 5000):
                need(budget, 45)
                steps = 3
                solver = DPG(scale=80, num_samples=num_samples, sampler="ddim", steps=steps, backend=backend,
                             r_min=0.05, estimator=estimator)

                def restore(solver=solver):
                    return solver.restore(model, task, y, seed=0, progress=False)

                res = sync_time(restore, 2)
                res["per_step_s"] = res["median_s"] / steps
                prefix = "rb-" if estimator == "rao-blackwell" else ""
                out[f"{dname}/dpg_step/{prefix}{backend}/N{num_samples}"] = res
                print(dname, backend, num_samples, res, flush=True)
    return out


def goals(report: dict) -> dict:
    t = report.get("timings", {})
    adm = report.get("adm", {})
    g = {}
    fused, eager = t.get("triton/N5000/B1", {}), t.get("eager/N5000/B1", {})
    if "median_s" in fused and "median_s" in eager:
        g["fused_speedup_over_eager_N5000"] = eager["median_s"] / fused["median_s"]
        g["fused_at_least_10x_faster_than_eager"] = g["fused_speedup_over_eager_N5000"] >= 10
    for dname in ("float32", "bfloat16"):
        fv = adm.get(f"{dname}/forward_vjp", {})
        for n in (500, 5000):
            f = t.get(f"triton/N{n}/B1", {})
            if "median_s" in fv and "median_s" in f:
                ratio = f["median_s"] / fv["median_s"]
                g[f"fused_N{n}_over_forward_vjp_{dname}"] = ratio
                g[f"fused_N{n}_under_10pct_of_forward_vjp_{dname}"] = ratio < 0.10
    rb, chunked = t.get("rb-triton/N5000/B1", {}), t.get("chunked/N5000/B1", {})
    if "median_s" in rb and "median_s" in fused:
        g["rb_fused_speedup_over_fused_N5000"] = fused["median_s"] / rb["median_s"]
    if "median_s" in rb and "median_s" in chunked:
        g["rb_fused_speedup_over_chunked_N5000"] = chunked["median_s"] / rb["median_s"]
    for dname in ("float32", "bfloat16"):
        fv = adm.get(f"{dname}/forward_vjp", {})
        if "median_s" in fv and "median_s" in rb:
            g[f"rb_fused_N5000_over_forward_vjp_{dname}"] = rb["median_s"] / fv["median_s"]
    return g


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for everything")
    parser.add_argument("--pytest-status", default=None, help="file holding the kernel tests' exit code")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    import triton

    name = torch.cuda.get_device_name()
    report: dict = {
        "gpu": name, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "default_config": repr(triton_dpg.DEFAULT_CONFIG), "skipped": {}, "errors": {},
    }
    if args.pytest_status and Path(args.pytest_status).exists():
        report["kernel_tests_exit_code"] = Path(args.pytest_status).read_text().strip()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    paths = [Path(__file__).resolve().parent / "results" / f"{slug}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"{slug}.json")

    def save():
        report["goals"] = goals(report)
        report["elapsed_s"] = time.monotonic() - START
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(report, indent=1, default=str) + "\n")

    parts = [("noise", lambda: check_noise()), ("directions", lambda: check_directions(args.budget)),
             ("rb_directions", lambda: check_rb_directions(args.budget)),
             ("timings", lambda: time_directions(args.budget)), ("adm", lambda: time_adm(args.budget)),
             ("fused_configs", lambda: time_fused_configs(args.budget))]
    for key, part in parts:
        try:
            report[key] = part()
        except OutOfTime as err:
            report["skipped"][key] = str(err)
        except Exception as err:  # record and go on: the other parts still say something
            report["errors"][key] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}"
        torch.cuda.empty_cache()
        save()
        print(f"[{time.monotonic() - START:.0f}s] {key} done", flush=True)
    ok = all(v.get("ok", True) for part in ("directions", "rb_directions") for v in report.get(part, {}).values())
    print(json.dumps({"goals": report["goals"], "directions_ok": ok, "errors": list(report["errors"]),
                      "skipped": report["skipped"]}, indent=1))
    return 0 if ok and not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
