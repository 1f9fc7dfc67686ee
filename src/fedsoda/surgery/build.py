"""The client's model: NF4 sub-LLM with emulator and adapter LoRA, saved as one folder.

Folder layout::

    model/                    NF4 sub-LLM (safetensors, config, tokenizer)
    emulator_lora.safetensors LoRA of the kept window starts s_i (server-trained)
    adapter_lora.safetensors  LoRA of the adapter layers (client-trained)
    lora.json                 LoRA spec and the layer indices of both sets
    plan.json                 the pruning plan
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fedsoda.surgery.lora import (
    LoraSpec,
    attach_lora,
    load_lora_state,
    lora_state,
    read_lora,
    save_lora,
)
from fedsoda.surgery.plan import PruningPlan
from fedsoda.surgery.quantize import load_nf4, save_nf4, storage_bytes
from fedsoda.surgery.subllm import build_sub_llm


@dataclass(frozen=True)
class SubLLM:
    """An NF4 sub-LLM (PEFT-wrapped) and the plan it was built from."""

    model: nn.Module
    plan: PruningPlan
    spec: LoraSpec

    @property
    def emulator_layers(self) -> list[int]:
        return [s for _, s in self.plan.index_map]

    @property
    def adapter_layers(self) -> list[int]:
        return self.plan.sub_adapter_layers

    def emulator_lora(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model, self.emulator_layers)

    def adapter_lora(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model, self.adapter_layers)


def _with_lora(model: nn.Module, plan: PruningPlan, spec: LoraSpec, seed: int) -> SubLLM:
    torch.manual_seed(seed)  # LoRA A matrices are drawn at random: make them reproducible
    layers = [s for _, s in plan.index_map] + plan.sub_adapter_layers
    return SubLLM(model=attach_lora(model, layers, spec), plan=plan, spec=spec)


def make_sub_llm(full_model: nn.Module, plan: PruningPlan, folder: Path | str, tokenizer=None,
                 spec: LoraSpec = LoraSpec(), device: str = "cpu", seed: int = 0) -> SubLLM:
    """Prune, quantize to NF4 (saved under ``folder/model``), reload and add both LoRA sets."""
    folder = Path(folder)
    save_nf4(build_sub_llm(full_model, plan.kept_layers), folder / "model", tokenizer)
    return _with_lora(load_nf4(folder / "model", device), plan, spec, seed)


def save_sub_llm(sub: SubLLM, folder: Path | str) -> dict[str, int]:
    """Write the LoRA sets, their layout and the plan beside ``folder/model``; returns sizes."""
    folder = Path(folder)
    sizes = {"emulator_lora_bytes": save_lora(sub.emulator_lora(), folder / "emulator_lora.safetensors"),
             "adapter_lora_bytes": save_lora(sub.adapter_lora(), folder / "adapter_lora.safetensors")}
    layout = {"spec": asdict(sub.spec), "emulator_layers": sub.emulator_layers,
              "adapter_layers": sub.adapter_layers}
    (folder / "lora.json").write_text(json.dumps(layout, indent=2) + "\n")
    sub.plan.save(folder / "plan.json")
    sizes["model_bytes"] = storage_bytes(folder / "model")
    sizes["client_model_bytes"] = (sizes["model_bytes"] + sizes["emulator_lora_bytes"]
                                   + sizes["adapter_lora_bytes"])
    return sizes


def open_sub_llm(folder: Path | str, device: str = "cpu") -> SubLLM:
    """Load a saved sub-LLM folder: NF4 weights, plan, and both LoRA sets."""
    folder = Path(folder)
    if not (folder / "lora.json").exists():
        raise FileNotFoundError(f"{folder} is not a sub-LLM folder (no lora.json); build one "
                                "with `fedsoda build`")
    layout = json.loads((folder / "lora.json").read_text())
    spec = layout["spec"]
    spec = LoraSpec(**{**spec, "targets": tuple(spec["targets"])})
    sub = _with_lora(load_nf4(folder / "model", device), PruningPlan.load(folder / "plan.json"), spec, 0)
    for name in ("emulator_lora.safetensors", "adapter_lora.safetensors"):
        if (folder / name).exists():  # a client may hold the emulator LoRA only
            load_lora_state(sub.model, read_lora(folder / name))
    return sub
