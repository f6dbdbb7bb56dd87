#!/usr/bin/env bash
# CI check: every CUDA kernel file compiles for sm_90 with nvcc alone (the .cu files
# include no torch headers). Fails on the first compile error; skips, with a
# message, only when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
out="$(mktemp -d /tmp/mas_local_nvcc.XXXXXX)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files"
  exit 0
fi
for f in "${files[@]}"; do
  # The same targets and half/bf16 restrictions as torch's extension build (setup.py).
  "$NVCC" -c -O3 -std=c++17 -Werror all-warnings \
    -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=compute_80 \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -o "$out/$(basename "$f" .cu).o" "$f"
  echo "check_cuda_compile: ok $f"
done
