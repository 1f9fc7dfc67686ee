#!/usr/bin/env bash
# The main job on the embedded default (bundled SmolLM2-135M, local data):
# prune by layer similarity, build and pre-align the NF4 sub-LLM, and score both models.
# Writes runs/main/. About 8 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/main}
mkdir -p "$out"
fedsoda=.venv/bin/fedsoda
$fedsoda prune --model smollm2-135m --n 3 --p 4 --adapter-layers 3 --samples 64 --out "$out/plan.json"
$fedsoda build --model smollm2-135m --plan "$out/plan.json" --out "$out/subllm"
$fedsoda eval --model smollm2-135m --task sst2 --out "$out/eval-full-sst2.json"
$fedsoda eval --model "$out/subllm" --task sst2 --out "$out/eval-sub-sst2.json"
