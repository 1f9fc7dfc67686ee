"""Server state after each round, written atomically so a run can resume."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class ServerState:
    """Everything the round loop needs to continue where it stopped."""

    round: int = 0
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # global adapter LoRA
    emulator: dict[str, torch.Tensor] = field(default_factory=dict)  # current emulator LoRA
    emulator_version: int = 0  # bumped at every realignment
    holders: dict[str, int] = field(default_factory=dict)  # node id -> emulator version held
    metrics: list[dict] = field(default_factory=list)  # one entry per finished round
    method: dict = field(default_factory=dict)  # what the method keeps between rounds (JSON)
    # Mid-round tensors (HierFedLoRA's group LoRA between intra-group rounds), so a run
    # stopped inside a global round resumes there; empty between rounds.
    partial: dict[str, torch.Tensor] = field(default_factory=dict)
    # The server's broadcast rounding residuals (quantized wire with error feedback down),
    # named "scope/tensor"; empty for fp32.
    wire_residual: dict[str, torch.Tensor] = field(default_factory=dict)


def save_checkpoint(state: ServerState, folder: Path | str) -> None:
    """Write ``folder`` as a whole or not at all (tmp folder, then rename)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.adapter.items()}, str(tmp / "adapter.safetensors"))
    save_file({k: v.contiguous() for k, v in state.emulator.items()}, str(tmp / "emulator.safetensors"))
    for name, tensors in (("partial", state.partial), ("wire_residual", state.wire_residual)):
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
    meta = {"round": state.round, "emulator_version": state.emulator_version,
            "holders": state.holders, "metrics": state.metrics, "method": state.method}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(folder: Path | str) -> ServerState:
    folder = Path(folder)
    if not (folder / "state.json").exists():
        old = folder.with_name(folder.name + ".old")  # crashed between the two renames
        if (old / "state.json").exists():
            folder = old
        else:
            raise FileNotFoundError(f"no checkpoint in {folder}; nothing to resume")
    meta = json.loads((folder / "state.json").read_text())
    return ServerState(round=meta["round"], adapter=load_file(str(folder / "adapter.safetensors")),
                       emulator=load_file(str(folder / "emulator.safetensors")),
                       emulator_version=meta["emulator_version"], holders=meta["holders"],
                       metrics=meta["metrics"], method=meta.get("method", {}),
                       partial=_optional(folder / "partial.safetensors"),
                       wire_residual=_optional(folder / "wire_residual.safetensors"))


def _optional(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.exists() else {}
