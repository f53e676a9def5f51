#!/usr/bin/env bash
# One device session's checks, in order of value, each under its own time limit so that a slow step cannot hide
# the others' results. Run from the repository root on the GPU machine; results land in $OUT (default ./gpu-out).
#
#   Wheels the GPU image lacks are carried in .whl/ (transformers >= 5.24, flash-linear-attention and fla-core,
#   hf-memory itself built with `pip wheel --no-deps -w .whl .`) and installed to /tmp/site.
#   Usage: bash benchmarks/gpu_session.sh [seconds per test file] [seconds per architecture's speed rows]
#   GPU_SPEED_ARCHS="titans hymba" picks the speed rows; GPU_TEST_FILES="test_kernels test_titans" the test files;
#   GPU_SWEEP_ARGS="--float32-matmul-precision high" is passed to the speed rows; GPU_GDN_THROUGHPUT_S=300 runs
#   gated_deltanet_throughput.py (vs fla's own model) under that limit.
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
# the Triton neural memory against its reference (skipped with GPU_SKIP_KERNEL_BENCH=1)
[ -n "${GPU_SKIP_KERNEL_BENCH:-}" ] || timeout "${GPU_KERNEL_BENCH_S:-120}" python3 "$REPO/benchmarks/titans_kernel_throughput.py" \
  --output "$OUT/titans_kernel.md" > "$OUT/titans_kernel.log" 2>&1; cat "$OUT/titans_kernel.log"
# hf-memory's GDN model vs flash-linear-attention's at the same configuration (when GPU_GDN_THROUGHPUT_S is set)
[ -z "${GPU_GDN_THROUGHPUT_S:-}" ] || timeout "$GPU_GDN_THROUGHPUT_S" python3 "$REPO/benchmarks/gated_deltanet_throughput.py" \
  --output "$OUT/gdn_throughput.md" > "$OUT/gdn_throughput.log" 2>&1; [ -z "${GPU_GDN_THROUGHPUT_S:-}" ] || tail -20 "$OUT/gdn_throughput.log"
# one pytest per file, each under its own limit, every report in one file (8 files at most come back)
for file in ${GPU_TEST_FILES:-test_kernels test_ssd_ops test_hymba test_rmt test_mor}; do
  echo "=== $file" >> "$OUT/pytest.txt"
  # a per-test limit (pytest-timeout) fails a hung test with its traceback and goes on, so the report is printed
  timeout "${1:-60}" python3 -m pytest -v -rA --tb=short -p no:cacheprovider --timeout "${GPU_TEST_TIMEOUT:-45}" \
    "$REPO/tests/$file.py" \
    -k "${GPU_TEST_FILTER:-cuda or fla_ or kernel_matches or mamba_ssm}" >> "$OUT/pytest.txt" 2>&1
  echo "$file: rc $? $(tail -1 "$OUT/pytest.txt")"
done
# correctness of every tiny preset (cheap; skipped with GPU_SKIP_TINY=1), then the speed rows one architecture at a time
[ -n "${GPU_SKIP_TINY:-}" ] || timeout 90 python3 "$REPO/benchmarks/gpu_sweep.py" --skip-speed \
  --output "$OUT/gpu_sweep_tiny.md" > "$OUT/sweep.log" 2>&1
for arch in ${GPU_SPEED_ARCHS:-titans hymba gated_deltanet}; do
  timeout "${2:-120}" python3 "$REPO/benchmarks/gpu_sweep.py" --steps 2 --architectures $arch --skip-tiny \
    ${GPU_SWEEP_ARGS:-} --output "$OUT/gpu_speed_$arch.md" >> "$OUT/sweep.log" 2>&1
  echo "$arch speed: rc $?"
done
grep "^|" "$OUT/sweep.log"
