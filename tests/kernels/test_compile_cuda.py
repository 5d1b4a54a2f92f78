"""The compiled path without a GPU: Triton compiles the fused kernels to an sm_90 cubin on the CPU.

The interpreter tests check what the kernels compute; this checks that Triton's compiler accepts
them (constexpr branches, the fast-math intrinsics, the loops), which the interpreter does not.
It runs in a fresh process because this one may have Triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import triton
from dpgkit.kernels import triton_dpg as T

assert not T.INTERPRETED
target = GPUTarget("cuda", 90, 32)
energy = {"e_ptr": "*fp32", "idx_ptr": "*i32", "wts_ptr": "*fp32", "part_ptr": "*fp32", "seed": "i64",
          "r": "fp32", "N": "i32", "M": "i32", "K": "constexpr", "L1": "constexpr", "BLOCK_N": "constexpr",
          "BLOCK_M": "constexpr", "FAST_MATH": "constexpr"}
combine = {"w_ptr": "*fp32", "part_ptr": "*fp32", "seed": "i64", "N": "i32", "D": "i32",
           "tiles_per_split": "i32", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr", "FAST_MATH": "constexpr"}
noise = {"out_ptr": "*fp32", "seed": "u64", "start": "i32", "N": "i32", "D": "i32", "BLOCK_N": "constexpr",
         "BLOCK_D": "constexpr", "FAST_MATH": "constexpr"}
cfg = T.DEFAULT_CONFIG
sizes = {}
for fast in (True, False):
    for name, fn, sig, const in [
        ("energy_l2", T._energy_kernel, energy, {"K": 16, "L1": False, "BLOCK_N": cfg.energy_block[0],
                                                  "BLOCK_M": cfg.energy_block[1]}),
        ("energy_l1", T._energy_kernel, energy, {"K": 1, "L1": True, "BLOCK_N": cfg.energy_block[0],
                                                  "BLOCK_M": cfg.energy_block[1]}),
        ("combine", T._combine_kernel, combine, {"BLOCK_N": cfg.combine_block[0], "BLOCK_D": cfg.combine_block[1]}),
        ("noise", T._noise_kernel, noise, {"BLOCK_N": 16, "BLOCK_D": 64}),
    ]:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={**const, "FAST_MATH": fast}),
                           target=target, options={"num_warps": cfg.num_warps})
        ptx = k.asm["ptx"]
        sizes[f"{name}/fast={fast}"] = {"cubin": len(k.asm["cubin"]), "cos_approx": ptx.count("cos.approx")}
print(json.dumps(sizes))
"""


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"compiling the kernels failed:\n{proc.stderr[-4000:]}", pytrace=False)
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(sizes) == 8 and all(s["cubin"] > 0 for s in sizes.values())
    # fast math really uses the approximate instruction, accurate math never does
    assert all((s["cos_approx"] > 0) == key.endswith("fast=True") for key, s in sizes.items())
