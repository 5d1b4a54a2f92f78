#!/usr/bin/env bash
# The GPU check of the fused guidance kernels, in one command, inside 8 minutes:
#   bash benchmarks/gpu_check.sh
# 1. makes dpgkit importable (pip install -e . --no-deps, offline) if it is not;
# 2. runs the kernel tests compiled on the GPU (tests/kernels, at most 150 s);
# 3. runs benchmarks/gpu_check.py (at most 300 s): checks against the reference on the GPU
#    (the published and the Rao-Blackwellized estimators' fused kernels), times eager / chunked /
#    fused / rb-fused / rb-chunked and one DPG step of the ADM ImageNet preset (fp32, bf16),
#    writes benchmarks/results/<gpu-name>.json (and $OUT/<gpu-name>.json when OUT is set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PYEOF

if ! "$PY" -c "import dpgkit.kernels" 2>/dev/null; then
    echo "installing dpgkit (editable, no dependencies)"
    if ! timeout 120 "$PY" -m pip install --no-deps --no-build-isolation -q -e .; then
        # offline without a build backend: link kernels/ in as dpgkit/kernels for this run
        echo "pip failed: linking kernels/ as dpgkit/kernels until the check ends"
        ln -s ../kernels dpgkit/kernels
        trap 'rm -f dpgkit/kernels' EXIT
    fi
    "$PY" -c "import dpgkit.kernels"
fi

STATUS="$(mktemp)"
set +e
# addopts cleared: pytest-benchmark may be missing there
timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider -o addopts="" tests/kernels
echo $? > "$STATUS"
set -e
echo "kernel tests exit code: $(cat "$STATUS")"

timeout 300 "$PY" benchmarks/gpu_check.py --budget 270 --pytest-status "$STATUS"
