#!/usr/bin/env bash
# GPU check for mas-local: one run on the GPU machine (one H200; torch 2.11+cu130, triton 3.6,
# nvcc 13.0, pytest; no network, nothing to install). From the repository root:
#
#     OUT=/tmp/out bash bench/gpu_check.sh
#
# Everything runs under ONE deadline, MAS_LOCAL_CHECK_SECONDS (default 480 s = 8 minutes on a
# warm machine, inside the 600 s a command may run); every step gets what is left of it:
#   1. preflight: torch sees a CUDA GPU (else it stops at once, exit 2);
#   2. build the C++/CUDA extension in place: sm_90 only (TORCH_CUDA_ARCH_LIST=9.0), all
#      cores (MAX_JOBS); fails the check if csrc/cuda/ exists but the build has no CUDA;
#   3. stage the package as it installs (mas_local/ with _C and kernels/ as mas_local.kernels)
#      under /tmp and check that python imports it from there, not from the checkout;
#   4. the GPU tests only, in two parallel pytest processes (the ext/ops/end-to-end tests
#      marked `cuda`, and the Triton test files), each test limited to
#      MAS_LOCAL_TEST_TIMEOUT seconds, failing if no CUDA test passed or one skipped for a
#      missing GPU backend (bench/pytest_gpu_check.py);
#   5. bench/gpu_table.py with autotuning off and no torch.compile baseline, its table
#      rewritten after every row;
# then a summary and, last, the table (whatever part of it was measured). Logs, the table
# and the summary go to $OUT (default /tmp/out).
#
# Without a GPU it stops after the preflight. MAS_LOCAL_CHECK_DRY_RUN=1 runs every step on a
# CPU machine anyway (CPU build, staging, the tests, `gpu_table.py --small` interpreted) to
# try the script itself; a dry run always ends FAILED, since no CUDA test can pass there.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# absolute, since steps run from /tmp (not resolving symlinks: a venv's python is one)
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
BUDGET=${MAS_LOCAL_CHECK_SECONDS:-480}
DRY=${MAS_LOCAL_CHECK_DRY_RUN:-0}
TEST_TIMEOUT=${MAS_LOCAL_TEST_TIMEOUT:-90}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
exec > >(tee "$OUT/gpu_check.log") 2>&1
unset TRITON_INTERPRET

status=0
declare -A RESULT
left() { echo $((DEADLINE - $(date +%s))); }
# seconds for a step: at most $1, and no more than what is left minus $2 (kept for later steps)
budget() {
    local want=$1 keep=$2 have
    have=$(( $(left) - keep ))
    (( have < want )) && want=$have
    (( want < 5 )) && want=5
    echo "$want"
}
step() { echo; echo "== [$(( $(date +%s) - START )) s] $*"; }
fail() { status=1; RESULT[$1]="FAILED: $2"; echo "FAILED ($1): $2"; }

finish() {
    local code=$?
    (( code != 0 && status == 0 )) && status=$code
    echo
    echo "== summary after $(( $(date +%s) - START )) s of $BUDGET s"
    for k in preflight build cuda_build stage tests_ops tests_triton table; do
        [ -n "${RESULT[$k]:-}" ] && printf '  %-13s %s\n' "$k" "${RESULT[$k]}"
    done
    echo "  overall       $([ "$status" -eq 0 ] && echo OK || echo "FAILED (exit $status)")"
    echo "  logs in $OUT"
    echo
    if [ -s "$OUT/gpu_table.md" ]; then cat "$OUT/gpu_table.md"; else echo "(no table: the table step did not run)"; fi
    exit "$status"
}
trap finish EXIT

step "preflight: $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $ROOT, deadline ${BUDGET} s"
if ! DRY=$DRY "$PY" - <<'PYEOF'
import os
import sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    if os.environ["DRY"] == "1":
        print("DRY RUN without a GPU: the steps run to try the script; the results mean nothing")
        sys.exit(0)
    sys.exit("no CUDA device visible to torch: bench/gpu_check.sh runs on the GPU machine only")
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "count", torch.cuda.device_count())
import triton
print("triton", triton.__version__)
PYEOF
then
    RESULT[preflight]="FAILED: see above"
    status=2
    exit 2
fi
RESULT[preflight]=ok
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step "build the extension in place (sm_90, MAX_JOBS=${MAX_JOBS:-$(nproc)})"
if [ -d csrc ]; then
    # torch derives CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc) would
    # give it a directory without the CUDA headers: ask nvcc where its toolkit is.
    if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null; then
        top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
        [ -n "$top" ] && [ -d "$top" ] && export CUDA_HOME="$(cd "$top" && pwd -P)"
    fi
    echo "CUDA_HOME=${CUDA_HOME:-unset} nvcc=$(command -v nvcc || echo none)"
    t=$(budget 200 280)
    MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        timeout -k 5 "$t" "$PY" setup.py build_ext --inplace > "$OUT/build_ext.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        RESULT[build]="ok in $(( $(date +%s) - START )) s ($(ls mas_local/_C*.so 2>/dev/null | head -1))"
    else
        tail -30 "$OUT/build_ext.log"
        fail build "setup.py build_ext exit $rc (124 = its ${t} s limit): $OUT/build_ext.log"
    fi
else
    RESULT[build]="no csrc/: nothing to build"
fi

step "stage the package as installed"
STAGE=$(mktemp -d /tmp/mas_local_stage.XXXXXX)
cp -r mas_local "$STAGE/mas_local"
cp kernels/*.py "$STAGE/mas_local/kernels/"  # what setup.py's build_py puts in a wheel
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
export PYTHONPATH="$STAGE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the staged package first; the checkout for tests/, bench/
if (cd /tmp && DRY=$DRY HAS_CUDA_DIR=$([ -d "$ROOT/csrc/cuda" ] && echo 1 || echo 0) "$PY" - "$STAGE" <<'PYEOF'
import os, sys
stage = os.path.realpath(sys.argv[1])
import mas_local, mas_local.kernels
from mas_local.ops import backend
for mod in (mas_local, mas_local.kernels):
    path = os.path.realpath(mod.__file__)
    print(f"{mod.__name__:18s} {path}")
    if not path.startswith(stage + os.sep):
        sys.exit(f"{mod.__name__} is imported from outside the staged copy {stage}")
for name in backend.BACKENDS:
    print(f"backend {name:7s} on cuda:", backend.unavailable_reason(name, "cuda") or "available")
if os.environ["DRY"] == "1":
    sys.exit(0)
if backend.unavailable_reason("triton", "cuda") is not None:
    sys.exit("the Triton backend cannot run on this GPU")
if os.environ["HAS_CUDA_DIR"] == "1":
    try:
        from mas_local.ops import ext
    except ImportError as exc:
        sys.exit(f"CUDA_BUILD: mas_local._C does not import ({exc})")
    if not ext.has_cuda():
        sys.exit("CUDA_BUILD: csrc/cuda/ exists but mas_local._C was built without CUDA kernels")
PYEOF
); then
    RESULT[stage]="ok ($STAGE)"
    RESULT[cuda_build]=$([ "$DRY" = 1 ] && echo "not checked (dry run)" || echo ok)
else
    fail stage "the staged package is incomplete or shadowed (see above)"
    RESULT[cuda_build]="FAILED or not checked (see above)"
fi

step "GPU tests (two pytest processes, ${TEST_TIMEOUT} s per test)"
t=$(budget 240 120)
pytest_args=(-q -ra -p no:cacheprovider -p bench.pytest_gpu_check --import-mode=append
             --rootdir "$ROOT" -c "$ROOT/pyproject.toml")
export MAS_LOCAL_TRITON_AUTOTUNE=0 MAS_LOCAL_REQUIRE_CUDA=1 MAS_LOCAL_TEST_TIMEOUT="$TEST_TIMEOUT"
export MAS_LOCAL_EXPECT_PACKAGE="$STAGE" MAS_LOCAL_GPU_CHECK=1
(cd /tmp && timeout -k 10 "$t" "$PY" -m pytest "${pytest_args[@]}" -m cuda \
    "$ROOT/tests/test_ops_gpu.py" "$ROOT/tests/test_ext.py" "$ROOT/tests/test_cuda_end_to_end.py") \
    > "$OUT/pytest_ops.log" 2>&1 &
pid_ops=$!
(cd /tmp && timeout -k 10 "$t" "$PY" -m pytest "${pytest_args[@]}" -m "not slow" \
    "$ROOT/tests/test_triton_runtime.py" "$ROOT/tests/test_triton_kernels.py") \
    > "$OUT/pytest_triton.log" 2>&1 &
pid_triton=$!
wait "$pid_ops"; rc_ops=$?
wait "$pid_triton"; rc_triton=$?
for part in ops triton; do
    rc_var=rc_$part
    echo "-- tests ($part): exit ${!rc_var} (124 = step limit of ${t} s)"
    grep -E "^(FAILED|ERROR)|cuda-marked|GPU CHECK|missing on the GPU|skipped [0-9]+x| passed| failed" \
        "$OUT/pytest_$part.log" | tail -25
    if [ "${!rc_var}" -eq 0 ]; then RESULT[tests_$part]=ok; else fail "tests_$part" "exit ${!rc_var}: $OUT/pytest_$part.log"; fi
done

step "benchmark table (autotuning off, torch.compile baseline off)"
t=$(budget 600 10)
table_args=(--out "$OUT/gpu_table.md")
[ "$DRY" = 1 ] && table_args+=(--small)
(cd /tmp && timeout -k 5 "$t" "$PY" "$ROOT/bench/gpu_table.py" "${table_args[@]}") > "$OUT/gpu_table.log" 2>&1
rc=$?
grep -v '^|' "$OUT/gpu_table.log" | grep -v '^$' | tail -15
case $rc in
    0) RESULT[table]="ok" ;;
    124|137) fail table "ran out of its ${t} s: the table below is partial ($OUT/gpu_table.log)" ;;
    *) fail table "exit $rc (1 = a check failed): $OUT/gpu_table.log" ;;
esac
