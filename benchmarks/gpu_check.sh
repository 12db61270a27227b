#!/usr/bin/env bash
# The one prepared GPU command: the whole test suite on CUDA, then benchmarks/gpu_report.py.
# It runs from the source tree (PYTHONPATH=.; the C++ extension is for CPUs and is not built
# there) on a machine with no network, so pure-Python packages its image lacks travel as wheels.
#
#   here:  bash benchmarks/gpu_check.sh --fetch-wheels     # once: fills .whl/ (git-ignored, ~10 MB)
#   there: bash benchmarks/gpu_check.sh                    # device tool, carry [".whl"]
#
# Writes benchmarks/results/<gpu>-<date>.json and, when $OUT is set, copies it and the logs there.
# Stages are capped (TESTS_S, REPORT_S, TRAIN_S below) so one call fits the device's limits.
set -uo pipefail
cd "$(dirname "$0")/.."

# albumentations and the dependencies the GPU image (torch 2.11, triton 3.6, opencv, scipy,
# numpy, pyyaml, typing-extensions present) does not have.
CARRIED="albumentations albucore stringzilla simsimd pydantic pydantic_core annotated_types typing_inspection"

if [ "${1:-}" = "--fetch-wheels" ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$tmp" "albumentations==2.0.8" || exit 1
    rm -rf .whl && mkdir .whl
    for name in $CARRIED; do cp "$tmp"/"$name"-*.whl .whl/ || { echo "no wheel for $name" >&2; exit 1; }; done
    rm -rf "$tmp"
    ls .whl
    exit 0
fi

PY=${PYTHON:-python3}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')" || exit 2
if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg R2UNET_FAST_CACHE=$(mktemp -d)
logs=${OUT:-benchmarks/results}
gpu=$($PY -c "import re, torch; n = torch.cuda.get_device_name(0); m = re.search(r'\b([A-Z]+\d{2,4}[A-Z]*)\b', n); print((m.group(1) if m else re.sub(r'\W+', '-', n)).lower())")
report=benchmarks/results/$gpu-$(date -u +%Y-%m-%d).json
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

# Stage caps in seconds keep the whole command inside one device call; 0 skips a stage (to rerun one).
# TESTS, REPORT_ARGS and TRAIN_ARGS are split on spaces; a -k expression goes in PYTEST_ADDOPTS.
# By default the tests are the CUDA cases (ids ...-cuda, marker cuda): the CPU cases run in CI.
export PYTEST_ADDOPTS=${PYTEST_ADDOPTS-"-k cuda --timeout 120"}
TESTS_S=${TESTS_S:-110} REPORT_S=${REPORT_S:-140} TRAIN_S=${TRAIN_S:-300}
TESTS=${TESTS:-tests/} REPORT_ARGS=${REPORT_ARGS:-} TRAIN_ARGS=${TRAIN_ARGS:-}

stage() {  # stage NAME CAP_S COMMAND...: run COMMAND under timeout, log to $logs/gpu-NAME.log, echo its status
    local name=$1 cap=$2
    shift 2
    if [ "$cap" -le 0 ]; then echo "skipped"; return; fi
    timeout "$cap" "$@" 2>&1 | tee "$logs/gpu-$name.log" >&2
    echo "${PIPESTATUS[0]}"
}

xdist=${XDIST-$($PY -c "import xdist" 2>/dev/null && echo "-n 14")}
# each failure is written to gpu-failures.txt as it happens: a session killed at its cap names them too
tests_rc=$(LIVE_FAILURES=$logs/gpu-failures.txt stage pytest "$TESTS_S" \
    $PY -m pytest -q -rs $xdist -p benchmarks.live_failures -p no:cacheprovider $TESTS)
report_rc=$(stage report "$REPORT_S" $PY benchmarks/gpu_report.py --out "$report" $REPORT_ARGS)
[ -n "${OUT:-}" ] && [ -f "$report" ] && cp "$report" "$OUT/"
# the training step end to end; its own budget leaves 20 s to write its results
train_rc=$(stage train "$TRAIN_S" $PY benchmarks/gpu_train.py --budget-s $((TRAIN_S - 20)) $TRAIN_ARGS)
echo "tests: $tests_rc, report: $report_rc, train: $train_rc (exit statuses), report: $report"
for rc in $tests_rc $report_rc $train_rc; do [ "$rc" = 0 ] || [ "$rc" = skipped ] || exit 1; done
