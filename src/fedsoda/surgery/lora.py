"""LoRA on chosen decoder layers, read and written as plain tensor dicts.

FedSODA keeps two LoRA sets on one sub-LLM: the emulator LoRA (kept starts ``s_i`` of the
pruned windows, trained on the server by alignment) and the adapter LoRA (the last ``L_A``
layers, trained by clients). Both live in one PEFT adapter; the sets are told apart by
layer index, so each can be exchanged, frozen or trained on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from fedsoda.models import LORA_TARGETS

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (FedSODA section 6.1.2: r=8, alpha=16)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA needs r >= 1 and alpha > 0, got r={self.r} alpha={self.alpha}")

    def config(self, layers: list[int]) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.targets), layers_to_transform=sorted(layers),
                          layers_pattern="layers", bias="none", task_type="CAUSAL_LM")


def attach_lora(model: nn.Module, layers: list[int], spec: LoraSpec = LoraSpec()) -> PeftModel:
    """Wrap ``model`` with LoRA on the target projections of ``layers`` (B = 0 at start)."""
    peft_model = get_peft_model(model, spec.config(layers))
    set_trainable(peft_model, [])
    return peft_model


def layer_of(name: str) -> int:
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not inside a decoder layer")
    return int(match.group(1))


def plain_name(name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight`` ->
    ``model.layers.3.self_attn.q_proj.lora_A.weight``."""
    return name.removeprefix("base_model.model.").replace(".default.", ".")


def _lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {plain_name(name): param for name, param in model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name}


def lora_state(model: nn.Module, layers: list[int]) -> dict[str, torch.Tensor]:
    """A detached copy of the LoRA tensors of ``layers`` (float32, contiguous, on CPU)."""
    wanted = set(layers)
    return {name: param.detach().float().cpu().contiguous().clone()
            for name, param in _lora_parameters(model).items() if layer_of(name) in wanted}


def lora_numel(model: nn.Module, layers: list[int]) -> int:
    """Number of LoRA parameters on ``layers`` (works on the meta device, unlike ``lora_state``)."""
    wanted = set(layers)
    return sum(param.numel() for name, param in _lora_parameters(model).items()
               if layer_of(name) in wanted)


def lora_sizes(model: nn.Module, layers: list[int]) -> list[int]:
    """The number of values of each LoRA tensor on ``layers`` (meta device too): what the
    wire formats' per-tensor block scales are counted on."""
    wanted = set(layers)
    return [param.numel() for name, param in _lora_parameters(model).items()
            if layer_of(name) in wanted]


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors into the model; every key must exist and every shape match."""
    params = _lora_parameters(model)
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"LoRA tensors not in this model: {unknown[:3]}{'...' if len(unknown) > 3 else ''}")
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}")
            params[name].copy_(tensor.to(params[name].dtype))


def set_trainable(model: nn.Module, layers: list[int]) -> list[nn.Parameter]:
    """Make exactly the LoRA tensors of ``layers`` trainable; everything else frozen."""
    wanted = set(layers)
    trainable = []
    for name, param in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        param.requires_grad_(is_lora and layer_of(name) in wanted)
        if param.requires_grad:
            trainable.append(param)
    return trainable


def save_lora(state: dict[str, torch.Tensor], path: Path | str) -> int:
    """Write a LoRA dict as safetensors (atomically); returns the file size in bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    return path.stat().st_size


def read_lora(path: Path | str) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return load_file(str(path))


def rename_layers(state: dict[str, torch.Tensor], mapping: dict[int, int]) -> dict[str, torch.Tensor]:
    """Move LoRA tensors to other layer indices (sub-LLM index -> full-model index)."""
    renamed = {}
    for name, tensor in state.items():
        index = layer_of(name)
        if index not in mapping:
            raise KeyError(f"{name}: layer {index} has no counterpart")
        renamed[_LAYER.sub(f".layers.{mapping[index]}.", name, count=1)] = tensor
    return renamed


def to_full(state: dict[str, torch.Tensor], layers: list[int] | tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Client-model names -> full-model names: position ``j`` holds full-model layer ``layers[j]``.

    LoRA tensors on the wire and in the server's state are named by full-model layer, so two
    clients holding different layers never give the same key to different layers.
    """
    return rename_layers(state, dict(enumerate(layers)))


def to_local(state: dict[str, torch.Tensor], layers: list[int] | tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Full-model names -> the names of a client model made of ``layers`` (in that order)."""
    return rename_layers(state, {full: position for position, full in enumerate(layers)})
