#!/usr/bin/env bash
# One device session's checks, in order of value, each under its own time limit so that a slow step cannot hide
# the others' results. Run from the repository root on the GPU machine; results land in $OUT (default ./gpu-out).
#
#   Wheels the GPU image lacks are carried in .whl/ (transformers >= 5.24, flash-linear-attention and fla-core,
#   hf-memory itself built with `pip wheel --no-deps -w .whl .`) and installed to /tmp/site.
#   Usage: bash benchmarks/gpu_session.sh [seconds for the tests] [seconds for the sweep]
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
REPO=$PWD OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
cd /tmp  # not the repository root: its hf_memory/ folder would shadow the installed package
python3 -c "import torch, transformers, hf_memory; print(torch.__version__, torch.cuda.get_device_name(),
transformers.__version__, hf_memory.__file__)" | tee "$OUT/env.txt"
# one pytest per file: a file cut off by its limit still leaves the others' reports
for file in test_kernels test_ssd_ops test_hymba test_rmt test_mor; do
  timeout "${1:-60}" python3 -m pytest -q -rA --tb=short -p no:cacheprovider "$REPO/tests/$file.py" \
    -k "cuda or fla_ or kernel_matches or mamba_ssm" > "$OUT/pytest_$file.txt" 2>&1
  echo "$file: rc $? $(tail -1 "$OUT/pytest_$file.txt")"
done
timeout "${2:-240}" python3 "$REPO/benchmarks/gpu_sweep.py" --steps 2 --output "$OUT/gpu_sweep.md" > "$OUT/gpu_sweep.log" 2>&1
grep "^|" "$OUT/gpu_sweep.log"
