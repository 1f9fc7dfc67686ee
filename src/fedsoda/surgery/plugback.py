"""Plug the adapter LoRA trained on the sub-LLM back into the full LLM, and export it.

The sub-LLM's adapter layers are full-model layers too (the last ``L_A``, and FedOT's first),
so the LoRA tensors move by layer name: sub-LLM layer ``i`` is full-model layer
``plan.kept_layers[i]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from fedsoda.surgery.lora import LoraSpec, attach_lora, load_lora_state, rename_layers
from fedsoda.surgery.plan import PruningPlan


def to_full_names(adapter_state: dict[str, torch.Tensor], plan: PruningPlan) -> dict[str, torch.Tensor]:
    """Rename adapter LoRA keys from sub-LLM layer indices to full-model indices."""
    mapping = {sub: plan.kept_layers[sub] for sub in plan.sub_adapter_layers}
    return rename_layers(adapter_state, mapping)


def plug_adapter(full_model: nn.Module, adapter_state: dict[str, torch.Tensor],
                 plan: PruningPlan, spec: LoraSpec = LoraSpec()) -> PeftModel:
    """The full LLM wrapped with LoRA on its adapter layers, holding the adapter LoRA."""
    peft_model = attach_lora(full_model, plan.full_adapter_layers, spec)
    load_lora_state(peft_model, to_full_names(adapter_state, plan))
    return peft_model


def export_peft(peft_model: PeftModel, folder: Path | str) -> Path:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained(full, folder)`` loads."""
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    return folder
