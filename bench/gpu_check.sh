#!/usr/bin/env bash
# The one command a session on a lent GPU machine runs (`make gpu-check`): that machine has no
# network and its own torch/triton, so nothing is installed from an index. It
#   1. installs wheels carried in .whl/ (packages the machine lacks, e.g. diffusers) into /tmp/osp-site,
#   2. installs osp in place (editable, no build isolation, no index),
#   3. runs the whole test suite with Triton compiled on the GPU,
#   4. runs the benchmark suite,
# writing logs and results under bench/results/ and, when OUT is set, a copy under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
stamp=$(date -u +%Y%m%dT%H%M%SZ)
res=bench/results
mkdir -p "$res"
log="$res/gpu-check-$stamp.log"
table="$res/gpu-check-$stamp.md"

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/osp-site .whl/*.whl \
        && export PYTHONPATH=/tmp/osp-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$log" 2>&1; then
    echo "editable install failed (see $log); falling back to a source-tree link for osp.kernels" | tee -a "$log"
    [ -e osp/kernels ] || ln -s ../kernels osp/kernels
fi

{ $PY -m osp info; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; } 2>&1 | tee -a "$log"

# Kernels compile on first use: several workers overlap compilation when pytest-xdist is there.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
$PY -m pytest -q -rfEs tests $xdist -p no:cacheprovider 2>&1 | tee -a "$log"
test_rc=${PIPESTATUS[0]}

$PY -m bench --markdown "$table" 2>&1 | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then
    cp "$log" "$OUT/" && [ -f "$table" ] && cp "$table" "$OUT/"
    [ -f "$res/results.jsonl" ] && cp "$res/results.jsonl" "$OUT/"
fi
echo "gpu-check: tests rc=$test_rc, bench rc=$bench_rc; log $log"
exit $(( test_rc != 0 ? test_rc : bench_rc ))
