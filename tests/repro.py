"""Fingerprints of a run folder that must not change when the code is refactored: the
exported adapter's tensors and every metric except wall-clock time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file

TIMING = ("seconds",)  # wall-clock fields; everything else in metrics.jsonl is deterministic


def adapter_hash(run: Path) -> str:
    tensors = load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def metrics_hash(run: Path) -> str:
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if k not in TIMING} for row in rows]
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
    import sys

    for folder in sys.argv[1:]:
        print(folder, adapter_hash(Path(folder)), metrics_hash(Path(folder)))
