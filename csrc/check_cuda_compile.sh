#!/usr/bin/env bash
# CI check that CUDA code cannot break unseen on a machine without a GPU:
#  1. every csrc/cuda/*.cu compiles for sm_90 with nvcc alone (they include no torch headers);
#  2. csrc/cuda/binding.cpp (the torch-facing CUDA registrations) passes `g++ -fsyntax-only`
#     against torch's headers, the CUDA runtime headers of nvcc's toolkit, and the C++
#     standard this torch builds extensions with.
# A CPU wheel of torch ships c10/cuda/*.h but not the one generated header
# c10/cuda/impl/cuda_cmake_macros.h (it only says that c10_cuda is a shared library);
# step 2 supplies that one line in a temporary include directory. binding.cpp uses
# c10's CUDA headers only: ATen/cuda/CUDAContext.h would also need cuBLAS/cuSPARSE
# headers, which a bare nvcc toolkit does not have.
# Fails on the first error; skips, with a message, only when nvcc (or, for step 2,
# torch) is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
# the project's virtual environment (make build) when there is one, else python3
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PYTHON="${PYTHON:-python3}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
out="$(mktemp -d /tmp/mas_local_nvcc.XXXXXX)"
trap 'rm -rf "$out"' EXIT

# The C++ standard torch's extension builder uses: C++20 from torch 2.10 on, C++17 before.
std=c++17
torch_ok=0
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  torch_ok=1
  std=$("$PYTHON" -c "import torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
print('c++20' if v >= (2, 10) else 'c++17')")
fi

shopt -s nullglob
files=(csrc/cuda/*.cu)
for f in "${files[@]}"; do
  # The same targets and half/bf16 restrictions as torch's extension build (setup.py).
  "$NVCC" -c -O3 -std="$std" -Werror all-warnings -gencode=arch=compute_90,code=sm_90 \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -o "$out/$(basename "$f" .cu).o" "$f"
  echo "check_cuda_compile: ok $f ($std, sm_90)"
done

binding=csrc/cuda/binding.cpp
[ -f "$binding" ] || exit 0
if [ "$torch_ok" != 1 ]; then
  echo "check_cuda_compile: $PYTHON cannot import torch, skipping the syntax check of $binding"
  exit 0
fi
# nvcc's own include directory (nvcc may be a wrapper script: ask it).
cuda_inc=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
if [ -z "$cuda_inc" ] || [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
  echo "check_cuda_compile: cannot find cuda_runtime.h next to $NVCC (got '$cuda_inc')" >&2
  exit 1
fi
mapfile -t torch_flags < <("$PYTHON" - <<'EOF'
import torch
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print("-I" + p)
print(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
EOF
)
shim="$out/include"
macros=c10/cuda/impl/cuda_cmake_macros.h
have_macros=0
for flag in "${torch_flags[@]}"; do
  case "$flag" in -I*) [ -f "${flag#-I}/$macros" ] && have_macros=1 ;; esac
done
if [ "$have_macros" = 0 ]; then
  mkdir -p "$shim/c10/cuda/impl"
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$shim/$macros"
fi
"${CXX:-g++}" -fsyntax-only -std="$std" -Wall -Werror "${torch_flags[@]}" -I"$shim" -I"$cuda_inc" \
  -DMAS_LOCAL_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H "$binding"
echo "check_cuda_compile: ok $binding (g++ -fsyntax-only, $std, torch headers, CUDA headers from $cuda_inc)"
