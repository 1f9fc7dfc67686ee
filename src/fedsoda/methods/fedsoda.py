"""FedSODA (FedSODA paper, Algorithm 2), as the server prepares and maintains it.

Recipe:
- adapter: the last ``L_A`` layers of the full LLM (default 3);
- emulator compression: similarity group pruning (``p`` windows of ``n`` layers), then NF4;
- LoRA r=8, alpha=16 on the kept window starts (emulator LoRA, server-trained) and on every
  adapter layer (adapter LoRA, client-trained);
- before training: pre-alignment, ``E_p`` epochs of distillation on public data;
- each round: clients train the adapter LoRA (task loss + FedProx), the server averages
  them (FedAvg by example count);
- every ``r`` rounds: realignment on a random public subset; the new emulator LoRA goes to
  clients with their next message;
- sent per round: adapter LoRA down and up; emulator LoRA down after a realignment;
  the NF4 sub-LLM once per client.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedsoda.align import oda
from fedsoda.align.oda import AlignSettings, TeacherCache, align, public_caches, realign_indices
from fedsoda.commands.model_prep import prune
from fedsoda.evaluate.tasks import evaluate
from fedsoda.models import load
from fedsoda.surgery.build import SubLLM, make_sub_llm, open_sub_llm, save_sub_llm
from fedsoda.surgery.lora import load_lora_state
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.plugback import export_peft, plug_adapter, to_full_names
from fedsoda.surgery.quantize import dense_bytes


@dataclass
class ServerModels:
    """The full LLM (teacher, holding the global adapter LoRA) and the NF4 sub-LLM."""

    teacher: nn.Module
    sub: SubLLM
    tokenizer: object
    folder: Path  # the sub-LLM folder clients download (``folder/model``)
    public: TeacherCache  # public batches with cached teacher activations
    heldout: TeacherCache
    sizes: dict  # storage bytes of what a client holds
    full_bf16_bytes: int


def prepare(model_spec: str, prune_settings: PruneSettings, settings: AlignSettings,
            data_dir: str | None, out: Path, pre_align: bool = True) -> ServerModels:
    """Plan (cached), build the NF4 sub-LLM with LoRA, cache the teacher, pre-align.

    If ``out/subllm`` already holds a built sub-LLM (a resumed run), it is reopened instead of
    rebuilt, and no pre-alignment runs again.
    """
    folder = out / "subllm"
    full, tokenizer = load(model_spec)
    if (folder / "lora.json").exists():
        sub, pre_align = open_sub_llm(folder), False
    else:
        plan = prune(model_spec, prune_settings, data_dir, str(out / "plan.json"),
                     loaded=(full, tokenizer))
        sub = make_sub_llm(full, plan, folder, tokenizer, seed=settings.seed)
    full_bf16_bytes = dense_bytes(full, 2)
    teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), sub.plan)
    del full
    public, heldout = public_caches(teacher, sub.plan, tokenizer, settings, data_dir)
    models = ServerModels(teacher=teacher, sub=sub, tokenizer=tokenizer, folder=folder,
                          public=public, heldout=heldout, sizes={},
                          full_bf16_bytes=full_bf16_bytes)
    if pre_align:
        report = oda.pre_align(teacher, sub.model, sub.plan, public, heldout, settings)
        (out / "align.json").write_text(json.dumps(report, indent=2) + "\n")
    models.sizes.update(save_sub_llm(sub, folder))
    return models


def set_global_adapter(models: ServerModels, adapter: dict[str, torch.Tensor]) -> None:
    """The same global adapter LoRA in the sub-LLM (student) and the full LLM (teacher)."""
    load_lora_state(models.sub.model, adapter)
    load_lora_state(models.teacher, to_full_names(adapter, models.sub.plan))


def realign(models: ServerModels, settings: AlignSettings, round_number: int) -> dict:
    """Realignment: ``E_r`` epochs on a random public subset; returns the emulator LoRA."""
    indices = realign_indices(models.public, settings, round_number)
    result = align(models.teacher, models.sub.model, models.sub.plan, models.public, settings,
                   settings.realign_epochs, batch_indices=indices)
    return {"emulator": models.sub.emulator_lora(), "seconds": result["seconds"],
            "loss": result["history"][-1]["loss"] if result["history"] else None}


def evaluate_full(models: ServerModels, task, rows: list[dict], data_dir: str | None) -> dict:
    """Accuracy of the deliverable: the full LLM with the plugged global adapter."""
    return evaluate(models.teacher, models.tokenizer, task, rows, data_dir=data_dir)


def evaluate_sub(models: ServerModels, task, rows: list[dict], data_dir: str | None) -> dict:
    """Accuracy of what clients see: the NF4 sub-LLM with both LoRA sets."""
    return evaluate(models.sub.model, models.tokenizer, task, rows, data_dir=data_dir)


def export_adapter(models: ServerModels, folder: Path) -> Path:
    """The global adapter as a PEFT folder for the full LLM."""
    return export_peft(models.teacher, folder)
