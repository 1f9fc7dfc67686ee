"""A model stored one file per decoder layer, and client models built from any subset.

Methods whose clients hold different layers each round (FedRA, FedPruner, HierFedLoRA) ship
the model as ``base.safetensors`` (embeddings, final norm, LM head: everything outside the
decoder stack), ``layer-NNN.safetensors`` per full-model layer ``NNN`` and the config and
tokenizer files. Files are named and stored by full-model index, so a layer's file is the
same whatever position it takes in a client's model, and a client whose layer set changes
fetches only the layers it lacks.

A client model made of ``layers`` holds full-model layer ``layers[j]`` at position ``j``:
the config's layer count and per-layer lists are pruned alike and each attention module's
``layer_idx`` is its position, as in ``fedsoda.surgery.subllm``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from fedsoda.models import decoder_layers, load, unwrap
from fedsoda.surgery.cpu_matmul import use_fp32_matmuls
from fedsoda.surgery.subllm import prune_config

BASE = "base.safetensors"
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def layer_file(layer: int) -> str:
    return f"layer-{layer:03d}.safetensors"


def save_layered(model: nn.Module, folder: Path | str, tokenizer=None,
                 dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``model`` (unwrapped, no LoRA) as a base file and one file per decoder layer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = unwrap(model)
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in base.state_dict().items()}
    if getattr(base.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    per_layer: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(decoder_layers(base)))}
    rest = {}
    for key, tensor in state.items():
        match = _LAYER_KEY.match(key)
        if match:
            per_layer[int(match.group(1))][key[match.end():]] = tensor
        else:
            rest[key] = tensor
    save_file(rest, str(folder / BASE))
    for index, tensors in per_layer.items():
        save_file(tensors, str(folder / layer_file(index)))
    base.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def layered_folder(model: str, tmp: Path | str, given: Path | str | None = None) -> Path:
    """``given``, a layered folder, as it is; else ``model`` loaded and written layered into
    ``tmp`` (what the memory benches measure on: a client's files)."""
    if given:
        return Path(given)
    full, tokenizer = load(model)
    return save_layered(full, Path(tmp) / "layered", tokenizer)


def folder_num_layers(folder: Path | str) -> int:
    """The decoder layer count in a layered model folder's ``config.json``."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def lora_shapes(folder: Path | str, layer: int, r: int, targets) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the LoRA tensors (PEFT's plain names, ``lora.lora_state``) that
    rank-``r`` LoRA on ``targets`` gives full-model ``layer``, read from the layer file's
    header alone: no weights load, so a memory probe can make them without a model."""
    shapes = {}
    with safe_open(str(Path(folder) / layer_file(layer)), framework="pt") as handle:
        for key in handle.keys():
            module, _, kind = key.rpartition(".")
            if kind != "weight" or module.rsplit(".", 1)[-1] not in targets:
                continue
            out_features, in_features = handle.get_slice(key).get_shape()
            prefix = f"model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (r, in_features)
            shapes[f"{prefix}.lora_B.weight"] = (out_features, r)
    return shapes


def layered_files(folder: Path | str, layers) -> list[str]:
    """The file names a client holding ``layers`` needs: config, tokenizer, base, its layers."""
    folder = Path(folder)
    common = sorted(p.name for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith("layer-"))
    return common + [layer_file(i) for i in sorted(layers)]


def load_layered(folder: Path | str, layers, paths: dict[str, Path] | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> nn.Module:
    """The causal LM made of full-model ``layers`` (in that order) of a layered model.

    ``folder`` holds the config; ``paths`` maps file names to where they are stored (a
    client's content store), defaulting to ``folder / name``.
    """
    folder, layers = Path(folder), list(layers)
    where = lambda name: Path(paths[name]) if paths and name in paths else folder / name  # noqa: E731
    config = AutoConfig.from_pretrained(folder)
    total = config.num_hidden_layers
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= total:
        raise ValueError(f"layers {layers} must be distinct indices of the model's {total} layers")
    prune_config(config, layers)
    with no_init_weights():  # every weight is loaded below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = load_file(str(where(BASE)))
    for position, index in enumerate(layers):
        for key, tensor in load_file(str(where(layer_file(index)))).items():
            state[f"model.layers.{position}.{key}"] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"layered model files do not fit the config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return use_fp32_matmuls(model.to(device).eval(), device)
