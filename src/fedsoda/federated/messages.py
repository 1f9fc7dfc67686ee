"""What goes on the wire: LoRA tensor dicts and model files as Flower ``ArrayRecord``s,
and the bytes and parameters they really take.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """LoRA tensors -> ``ArrayRecord`` (float32, names kept)."""
    return ArrayRecord(OrderedDict((k, Array(v.detach().cpu().float().contiguous().numpy()))
                                   for k, v in state.items()))


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``ArrayRecord`` -> tensors. Conversion goes through numpy so it works in any process."""
    return {key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of a record's arrays (what is actually sent)."""
    return sum(len(array.data) for array in record.values())


def record_params(record: ArrayRecord) -> int:
    """Number of values in the record's arrays."""
    return sum(int(np.prod(array.shape)) for array in record.values())


def files_record(folder: Path | str) -> ArrayRecord:
    """Every file of a model folder as raw bytes (the one-time sub-LLM download)."""
    folder = Path(folder)
    return ArrayRecord(OrderedDict(
        (path.name, Array(np.frombuffer(path.read_bytes(), dtype=np.uint8)))
        for path in sorted(folder.iterdir()) if path.is_file()))


def write_files(record: ArrayRecord, folder: Path | str) -> Path:
    """Write a files record into ``folder`` atomically (a partial folder is never used)."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name, array in record.items():
        if "/" in name or name.startswith("."):
            raise ValueError(f"refusing to write file {name!r} outside the model folder")
        (partial / name).write_bytes(array.numpy().tobytes())
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    partial.rename(folder)
    return folder
