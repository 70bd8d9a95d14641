#!/usr/bin/env bash
# The one command a session on a lent GPU machine runs (`make gpu-check`): that machine has no
# network and its own torch/triton, so nothing is installed from an index. It
#   1. installs wheels carried in .whl/ (packages the machine lacks, e.g. diffusers) into /tmp/osp-site,
#   2. installs osp in place (editable, no build isolation, no index),
#   3. runs the whole test suite with Triton compiled on the GPU,
#   4. runs the benchmark suites one at a time (each appends its rows as soon as it ends),
# writing logs and results under bench/results/ and, when OUT is set, copies under $OUT after every
# step, so a run cut off by a time limit still returns what it finished.
# GPU_CHECK_PARTS=tests or =bench runs one half; GPU_CHECK_OPS=group_norm,vae limits the suites.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
parts=${GPU_CHECK_PARTS:-tests,bench}
stamp=$(date -u +%Y%m%dT%H%M%SZ)
res=bench/results
mkdir -p "$res"
log="$res/gpu-check-$stamp.log"
table="$res/gpu-check-$stamp.md"

publish() {  # copy what exists so far to $OUT (at most a few files: the tool returns 8)
    [ -n "${OUT:-}" ] || return 0
    cp "$log" "$OUT/gpu-check.log" 2>/dev/null
    [ -f "$table" ] && cp "$table" "$OUT/gpu-check.md"
    [ -f "$res/results.jsonl" ] && cp "$res/results.jsonl" "$OUT/results.jsonl"
    return 0
}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/osp-site .whl/*.whl \
        && export PYTHONPATH=/tmp/osp-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$log" 2>&1; then
    echo "editable install failed (see $log); falling back to a source-tree link for osp.kernels" | tee -a "$log"
    [ -e osp/kernels ] || ln -s ../kernels osp/kernels
fi
{ $PY -m osp info; $PY -c "import diffusers; print('diffusers', diffusers.__version__, 'imports')"; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv; } 2>&1 | tee -a "$log"
publish

test_rc=0
if [[ ",$parts," == *",tests,"* ]]; then
    # Kernels compile on first use: several workers overlap compilation when pytest-xdist is there.
    xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
    timeout=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")
    $PY -m pytest -q -rfEs tests $xdist $timeout -p no:cacheprovider 2>&1 | tee -a "$log"
    test_rc=${PIPESTATUS[0]}
    publish
fi

bench_rc=0
if [[ ",$parts," == *",bench,"* ]]; then
    ops=${GPU_CHECK_OPS:-$(ls bench/bench_*.py | sed 's|bench/bench_||; s|\.py$||' | paste -sd, -)}
    for op in ${ops//,/ }; do
        $PY -m bench --ops "$op" --markdown "$res/.gpu-check-$op.md" 2>&1 | tee -a "$log"
        rc=${PIPESTATUS[0]}
        [ "$rc" -ne 0 ] && bench_rc=$rc
        cat "$res/.gpu-check-$op.md" >>"$table" 2>/dev/null && rm -f "$res/.gpu-check-$op.md"
        publish
    done
fi

# The tiled-decode memory figure (every device's newest rows), when matplotlib is there.
if $PY -m bench.bench_vae_tiling --figure "$res/vae_tiling_memory.png" >>"$log" 2>&1 && [ -n "${OUT:-}" ]; then
    cp "$res/vae_tiling_memory.png" "$OUT/vae_tiling_memory.png"
fi
echo "gpu-check: tests rc=$test_rc, bench rc=$bench_rc; log $log" | tee -a "$log"
publish
exit $(( test_rc != 0 ? test_rc : bench_rc ))
