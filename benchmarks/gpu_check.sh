#!/usr/bin/env bash
# The one prepared GPU command: the whole test suite on CUDA, then benchmarks/gpu_report.py.
# It runs from the source tree (PYTHONPATH=.; the C++ extension is for CPUs and is not built
# there) on a machine with no network, so pure-Python packages its image lacks travel as wheels.
#
#   here:  bash benchmarks/gpu_check.sh --fetch-wheels     # once: fills .whl/ (git-ignored, ~10 MB)
#   there: bash benchmarks/gpu_check.sh                    # device tool, carry [".whl"]
#
# Writes benchmarks/results/<gpu>-<date>.json and, when $OUT is set, copies it and the logs there.
# Stages are capped at 150 s + 390 s so one call fits the device's 600 s limit.
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

timeout 150 $PY -m pytest -q -rs -p no:cacheprovider tests/ 2>&1 | tee "$logs/gpu-pytest.log"
tests_rc=${PIPESTATUS[0]}
timeout 390 $PY benchmarks/gpu_report.py --out "$report" 2>&1 | tee "$logs/gpu-report.log"
report_rc=${PIPESTATUS[0]}
[ -n "${OUT:-}" ] && [ -f "$report" ] && cp "$report" "$OUT/"
echo "tests rc=$tests_rc, report rc=$report_rc, report: $report"
[ "$tests_rc" = 0 ] && [ "$report_rc" = 0 ]
