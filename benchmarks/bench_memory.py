"""Peak resident memory of the streaming DPG paths on the CPU against the number of samples N.

The chunked paths hold O(chunk x D) at a time, so their peak resident set should not depend on N.
It did (+48 MB per 1000 samples, issue 13 item 10): a fresh buffer per chunk, freed, and kept
resident by glibc's allocator. Each (path, N) runs in a fresh subprocess, which reports its peak
resident set (VmHWM of /proc/self/status) and its resident set just before the call (VmRSS): the
difference is what the call added. Problem: two 3 x 64 x 64 images, chunk 256, Gaussian noise,
one torch thread.

    python benchmarks/bench_memory.py                      # all paths, N = 256 .. 8192
    python benchmarks/bench_memory.py --out results/x.json --label after

Paths: "batched" (one operator shared by the batch: the chunked path vectorised over items,
`reference.dpg_direction_batched`), "chunked" (per-item operators: `dpg_direction_chunked` item by
item), "stream" (the noise stream alone: `torch_normal` drawn chunk by chunk into one buffer).
Not a timed test: it reports numbers and whether the peak is flat, and exits 1 when it is not.
Flat: the call's peak varies by at most FLAT_MB over N (the first two or three chunks of a call
settle glibc's heap, a bounded cost, ~25 to 50 MiB here; the same N varies by ~12 MiB from run to
run) and its least-squares slope in N is at most SLOPE_MB per 1000 samples (it was ~48 MiB per
1000 samples before the chunk buffers were reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

NS = (256, 512, 1024, 2048, 4096, 8192)
PATHS = ("batched", "chunked", "stream")
FLAT_MB = 64.0  # allowed spread of the call's peak over all N
SLOPE_MB = 5.0  # allowed least-squares growth per 1000 samples
SHAPE = (3, 64, 64)
CHUNK = 256


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def child(path: str, n: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import dpgkit as dk
    from dpgkit import kernels
    from dpgkit.kernels.reference import torch_normal

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *SHAPE, generator=g) * 2 - 1
    x0hat = (x + 0.2 * torch.randn(2, *SHAPE, generator=g)).clamp(-1, 1)
    noise = dk.noise.Gaussian(0.05)
    # batched: one operator shared by both items; chunked: one kernel per item
    shared = path == "batched"
    op = dk.operators.GaussianBlur(9, 1.5) if shared else dk.operators.MotionBlur(9, 0.5).draw([1, 2], SHAPE)
    y = noise.simulate(op(x), [torch.Generator().manual_seed(b) for b in range(2)])
    z_raw = noise.energy(y, op(x0hat)).double()
    r = noise.width(z_raw, float(x0hat[0].numel()), 0.05)
    # warm-up with 2 samples of one item: libraries loaded, without leaving chunk-sized buffers
    # resident for the measured call to reuse
    kernels.dpg_direction(x0hat[:1], y[:1], op.item(0), noise, r[:1], z_raw[:1], z_raw[:1], 2, [7],
                          backend="chunked", chunk_size=CHUNK)
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    if path == "stream":
        d = x0hat[0].numel()
        buf = torch.empty(CHUNK * d)
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            torch_normal(7, s, m, d, "cpu", out=buf[: m * d].view(m, d))
    else:
        kernels.dpg_direction(x0hat, y, op, noise, r, z_raw, z_raw, n, [7, 8], backend="chunked",
                              chunk_size=CHUNK)
    peak = _kib("VmHWM")
    return {"path": path, "num_samples": n, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "call_added_mib": (peak - before) / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory-cpu.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rows, flat = [], {}
    for path in args.paths:
        for n in args.ns:
            proc = subprocess.run([sys.executable, __file__, "--child", path, str(n)], env=env,
                                  capture_output=True, text=True, check=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{path:8s} N={n:5d}  peak {row['peak_mib']:7.1f} MiB  added by the call "
                  f"{row['call_added_mib']:6.1f} MiB", flush=True)
        mine = [r for r in rows if r["path"] == path]
        added = [r["call_added_mib"] for r in mine]
        ns = [r["num_samples"] / 1000 for r in mine]
        n_mean, a_mean = sum(ns) / len(ns), sum(added) / len(added)
        var = sum((n - n_mean) ** 2 for n in ns)
        slope = sum((n - n_mean) * (a - a_mean) for n, a in zip(ns, added)) / var if var > 0 else 0.0
        spread = max(added) - min(added)
        flat[path] = {"spread_mib": spread, "slope_mib_per_1000": slope,
                      "flat": spread <= FLAT_MB and slope <= SLOPE_MB}
    import torch

    result = {"label": args.label, "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "load_average": os.getloadavg(), "shape": SHAPE, "batch": 2,
              "chunk_size": CHUNK, "flat_threshold_mib": FLAT_MB, "slope_threshold_mib_per_1000": SLOPE_MB,
              "rows": rows, "flat": flat}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(flat))
    return 0 if all(v["flat"] for v in flat.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
