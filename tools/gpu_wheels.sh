#!/usr/bin/env bash
# Fills a folder with the wheels that tools/gpu_benchmark.sh installs on a CUDA machine with no
# network: every package of tools/gpu-requirements.txt, for Python 3.12 on manylinux x86_64.
# Run it on a machine with network, after `make env` (sam2 is built against the project's torch).
#
#   tools/gpu_wheels.sh [WHEEL_DIR]        (default: wheels/)
#
# Binary wheels are downloaded where PyPI has them; source-only packages (sam2 with
# SAM2_BUILD_CUDA=0, antlr4-python3-runtime, iopath) are built here into pure-Python wheels.
set -euo pipefail
if (($# > 1)) || [[ ${1:-} == -* ]]; then  # --help among them: not a folder to fill
    echo "usage: $0 [WHEEL_DIR]   (default: wheels; a relative folder is in the repository's root)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
PYTHON=${PYTHON:-.venv/bin/python}
REQUIREMENTS=tools/gpu-requirements.txt
LIMIT_MB=60
SOURCE_ONLY=(sam2 antlr4-python3-runtime iopath)

only_source="^($(IFS='|'; echo "${SOURCE_ONLY[*]}"))=="
requirements=$(grep -E '^[A-Za-z0-9]' "$REQUIREMENTS")
binary=$(grep -Ev "$only_source" <<<"$requirements")
source=$(grep -E "$only_source" <<<"$requirements")

mkdir -p "$WHEELS"
# shellcheck disable=SC2086
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    $binary
# shellcheck disable=SC2086
SAM2_BUILD_CUDA=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WHEELS" \
    $source

for wheel in "$WHEELS"/*.whl; do
    case "$wheel" in
        *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-* | *-abi3-*manylinux*x86_64*.whl) ;;
        *) echo "error: $wheel does not install on CPython 3.12, manylinux x86_64" >&2; exit 1 ;;
    esac
done
size_mb=$(du -sm "$WHEELS" | cut -f1)
echo "$(find "$WHEELS" -name '*.whl' | wc -l) wheels in $WHEELS, ${size_mb} MB"
if ((size_mb > LIMIT_MB)); then
    echo "error: $WHEELS holds ${size_mb} MB, over the ${LIMIT_MB} MB it must fit in" >&2
    exit 1
fi
