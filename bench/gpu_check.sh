#!/usr/bin/env bash
# GPU check for mas-local, one run on the GPU machine (H200; torch 2.11+cu130, triton 3.6,
# pytest; no network, nothing to install). From the repository root:
#
#     OUT=/tmp/out bash bench/gpu_check.sh
#
# 1. builds the C++/CUDA extension in place if csrc/ exists;
# 2. makes mas_local (with mas_local.kernels) importable: an offline editable install,
#    or, if pip cannot do it, a plain copy of the package under /tmp on PYTHONPATH;
# 3. runs the test suite on the GPU (real compilation, bf16, fp8);
# 4. runs bench/gpu_table.py (naive vs reference point vs backends, DESIGN.md §5 sizes);
# and prints the table last. Logs and the table go to ${OUT:-/tmp/out}.
# Budget: about 8 minutes typical (timeouts: build 180 s, tests 180 + 150 s, table 300 s).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1
status=0

echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') mas-local GPU check in $ROOT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || echo "nvidia-smi failed"
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible to torch: this script is for the GPU machine")
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
PYEOF
unset TRITON_INTERPRET || true

echo "== build"
if [ -d csrc ]; then
    if ! timeout 180 "$PY" setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1; then
        echo "extension build FAILED (tail of $OUT/build_ext.log):"
        tail -30 "$OUT/build_ext.log"
        status=1
    else
        echo "extension built: $(ls mas_local/_C*.so 2>/dev/null || echo '(no .so found)')"
    fi
else
    echo "no csrc/: nothing to build"
fi

echo "== install"
# MAS_LOCAL_NO_EXT=1: the extension was built in place above; do not build it twice.
if MAS_LOCAL_NO_EXT=1 timeout 120 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . \
        > "$OUT/pip_install.log" 2>&1 \
   && (cd /tmp && "$PY" -c "import mas_local.kernels") >> "$OUT/pip_install.log" 2>&1; then
    echo "editable install ok"
else
    echo "editable install impossible here (tail of $OUT/pip_install.log):"
    tail -8 "$OUT/pip_install.log"
    PKG=/tmp/mas_local_pkg
    rm -rf "$PKG" && mkdir -p "$PKG"
    cp -r mas_local "$PKG/mas_local"
    if [ -f kernels/__init__.py ]; then cp -r kernels "$PKG/mas_local/kernels"; fi
    export PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
    echo "fallback: copied the package to $PKG (PYTHONPATH)"
fi
(cd /tmp && "$PY" - <<'PYEOF'
import mas_local
from mas_local.ops import backend
print("mas_local from", mas_local.__file__)
for name in backend.BACKENDS:
    print(f"  backend {name:7s} on cuda:", backend.unavailable_reason(name, "cuda") or "available")
if backend.unavailable_reason("triton", "cuda") is not None:
    raise SystemExit("the Triton backend cannot run on this GPU: see above")
PYEOF
)

echo "== tests (GPU)"
# From /tmp, so that `import mas_local` finds the installed (or copied) package with its kernels.
# The Triton kernel tests first (a failure elsewhere must not hide them), then the rest of tests/.
set +e
(cd /tmp && MAS_LOCAL_TRITON_AUTOTUNE=0 timeout 180 "$PY" -m pytest "$ROOT/tests/test_triton_kernels.py" \
    -q -ra -p no:cacheprovider) > "$OUT/pytest_triton.log" 2>&1
rc_triton=$?
(cd /tmp && MAS_LOCAL_TRITON_AUTOTUNE=0 timeout 150 "$PY" -m pytest "$ROOT/tests" \
    --ignore="$ROOT/tests/test_triton_kernels.py" -q -ra -p no:cacheprovider) > "$OUT/pytest_rest.log" 2>&1
rc_rest=$?
set -e
echo "-- tests/test_triton_kernels.py:"
tail -30 "$OUT/pytest_triton.log"
echo "-- the other tests:"
tail -20 "$OUT/pytest_rest.log"
# pytest exit code 5 = no tests collected (no other test modules yet): not a failure.
[ "$rc_rest" -eq 5 ] && rc_rest=0
rc_tests=$(( rc_triton > rc_rest ? rc_triton : rc_rest ))
echo "pytest exit codes: triton $rc_triton, rest $rc_rest (124 = timeout)"
[ "$rc_tests" -eq 0 ] || status=1

echo "== benchmark table"
set +e
(cd /tmp && timeout 300 "$PY" "$ROOT/bench/gpu_table.py" --out "$OUT/gpu_table.md") > "$OUT/gpu_table.log" 2>&1
rc_bench=$?
set -e
tail -15 "$OUT/gpu_table.log" | grep -v '^|' || true
echo "gpu_table exit code: $rc_bench (124 = timeout; 1 = a check failed)"
[ "$rc_bench" -eq 0 ] || status=1

echo
echo "== summary: tests rc=$rc_tests, table rc=$rc_bench, overall $([ $status -eq 0 ] && echo OK || echo FAILED)"
echo
if [ -f "$OUT/gpu_table.md" ]; then cat "$OUT/gpu_table.md"; else echo "(no table written)"; fi
exit $status
