#!/usr/bin/env bash
# The test command: every fast test plus the SmolLM2 tests marked `ci`
# (`FEDSODA_TESTS=all` also runs the remaining slow ones).
set -euo pipefail
cd "$(dirname "$0")/.."
export FEDSODA_DATA_DIR=${FEDSODA_DATA_DIR:-$(cd .. && pwd)/shared/data}
if [ "${FEDSODA_TESTS:-}" = all ]; then selection=(); else selection=(-m "not slow or ci"); fi
exec .venv/bin/python -m pytest -q --durations=15 "${selection[@]}" "$@"
