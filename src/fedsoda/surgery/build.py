"""The client's model: NF4 sub-LLM with emulator and adapter LoRA, saved as one folder.

The baselines hold other client models in the same layout: FedOT and FedBiOT a 16-bit
uniformly pruned model with LoRA on every emulator layer, FedPETuning the whole 16-bit model
with LoRA on every layer.

Folder layout::

    model/                    the sub-LLM, NF4 or bf16 (safetensors, config, tokenizer)
    emulator_lora.safetensors LoRA of the kept window starts s_i (server-trained)
    adapter_lora.safetensors  LoRA of the adapter layers (client-trained)
    lora.json                 LoRA spec, quantization and the layer indices of both sets
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
from fedsoda.surgery.quantize import load_client_weights, save_client_weights, storage_bytes
from fedsoda.surgery.subllm import build_sub_llm

EMULATOR_LORA = ("starts", "all", "none")


def emulator_lora_layers(plan: PruningPlan, which: str) -> list[int]:
    """Sub-LLM layers that carry the server-trained emulator LoRA.

    ``starts``: the kept window starts ``s_i`` (FedSODA); ``all``: every kept emulator layer
    (FedOT, FedBiOT); ``none``: no emulator LoRA (FedPETuning).
    """
    if which not in EMULATOR_LORA:
        raise ValueError(f"emulator LoRA must be one of {EMULATOR_LORA}, got {which!r}")
    if which == "starts":
        return [s for _, s in plan.index_map]
    return plan.sub_emulator_layers if which == "all" else []


@dataclass(frozen=True)
class SubLLM:
    """A client model (PEFT-wrapped), the plan it was built from and its LoRA layout."""

    model: nn.Module
    plan: PruningPlan
    spec: LoraSpec
    emulator_layers: list[int]  # sub-LLM layers with server-trained LoRA
    quantization: str = "nf4"  # "nf4" or "bf16"

    @property
    def adapter_layers(self) -> list[int]:
        return self.plan.sub_adapter_layers

    def emulator_lora(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model, self.emulator_layers)

    def adapter_lora(self) -> dict[str, torch.Tensor]:
        return lora_state(self.model, self.adapter_layers)


def _with_lora(model: nn.Module, plan: PruningPlan, spec: LoraSpec, seed: int,
               emulator_layers: list[int], quantization: str) -> SubLLM:
    torch.manual_seed(seed)  # LoRA A matrices are drawn at random: make them reproducible
    layers = sorted(set(emulator_layers) | set(plan.sub_adapter_layers))
    return SubLLM(model=attach_lora(model, layers, spec), plan=plan, spec=spec,
                  emulator_layers=list(emulator_layers), quantization=quantization)


def make_sub_llm(full_model: nn.Module, plan: PruningPlan, folder: Path | str, tokenizer=None,
                 spec: LoraSpec = LoraSpec(), device: str = "cpu", seed: int = 0,
                 quantization: str = "nf4", emulator_lora: str = "starts") -> SubLLM:
    """Prune, store as clients hold it (``folder/model``), reload and add both LoRA sets."""
    folder = Path(folder)
    save_client_weights(build_sub_llm(full_model, plan.kept_layers), folder / "model",
                        quantization, tokenizer)
    return _with_lora(load_client_weights(folder / "model", quantization, device), plan, spec,
                      seed, emulator_lora_layers(plan, emulator_lora), quantization)


def sketch_sub_llm(full_model: nn.Module, plan: PruningPlan, spec: LoraSpec = LoraSpec(),
                   seed: int = 0, quantization: str = "nf4", emulator_lora: str = "starts") -> SubLLM:
    """The client model pruned in memory with both LoRA sets, neither quantized nor stored:
    its structure as clients would hold it (the meta device works)."""
    return _with_lora(build_sub_llm(full_model, plan.kept_layers), plan, spec, seed,
                      emulator_lora_layers(plan, emulator_lora), quantization)


def save_sub_llm(sub: SubLLM, folder: Path | str) -> dict[str, int]:
    """Write the LoRA sets, their layout and the plan beside ``folder/model``; returns sizes."""
    folder = Path(folder)
    sizes = {"emulator_lora_bytes": save_lora(sub.emulator_lora(), folder / "emulator_lora.safetensors"),
             "adapter_lora_bytes": save_lora(sub.adapter_lora(), folder / "adapter_lora.safetensors")}
    layout = {"spec": asdict(sub.spec), "quantization": sub.quantization,
              "emulator_layers": sub.emulator_layers, "adapter_layers": sub.adapter_layers}
    (folder / "lora.json").write_text(json.dumps(layout, indent=2) + "\n")
    sub.plan.save(folder / "plan.json")
    sizes["model_bytes"] = storage_bytes(folder / "model")
    sizes["client_model_bytes"] = (sizes["model_bytes"] + sizes["emulator_lora_bytes"]
                                   + sizes["adapter_lora_bytes"])
    return sizes


def open_sub_llm(folder: Path | str, device: str = "cpu") -> SubLLM:
    """Load a saved sub-LLM folder: weights, plan, and both LoRA sets."""
    folder = Path(folder)
    if not (folder / "lora.json").exists():
        raise FileNotFoundError(f"{folder} is not a sub-LLM folder (no lora.json); build one "
                                "with `fedsoda build`")
    layout = json.loads((folder / "lora.json").read_text())
    spec = layout["spec"]
    spec = LoraSpec(**{**spec, "targets": tuple(spec["targets"])})
    quantization = layout.get("quantization", "nf4")
    sub = _with_lora(load_client_weights(folder / "model", quantization, device),
                     PruningPlan.load(folder / "plan.json"), spec, 0, layout["emulator_layers"],
                     quantization)
    for name in ("emulator_lora.safetensors", "adapter_lora.safetensors"):
        if (folder / name).exists():  # a client may hold the emulator LoRA only
            load_lora_state(sub.model, read_lora(folder / name))
    return sub
