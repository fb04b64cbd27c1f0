#!/usr/bin/env bash
# The prepared device check (benchmarks/gpu_check.md): benchmarks/gpu_check.sh OUT_DIR [options]
# On the device `python3` holds torch; here the project's venv. PYTHON=... overrides.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
exec "$PYTHON" "$repo/benchmarks/gpu_check.py" "$@"
