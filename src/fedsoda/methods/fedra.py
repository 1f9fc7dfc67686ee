"""FedRA: random allocation of layer subsets to heterogeneous clients (Su et al. 2023, "FedRA:
A Random Allocation Strategy for Federated Tuning to Unleash the Power of Heterogeneous
Clients").

Algorithm (one global round):
- client ``i`` can hold ``K_i`` of the full model's ``L`` decoder layers (its capacity, from
  ``client_layers`` in the config, e.g. ``"6x4,12x4,30x2"``; empty: every client holds all);
- the server draws, for each sampled client, ``K_i`` distinct layers uniformly at random,
  kept in their original order, as that client's sub-model (embeddings, final norm and LM
  head always included); the draw is seeded by (seed, round, client), so a resumed run draws
  the same;
- the client builds that sub-model from per-layer files (fetching only layers it lacks),
  attaches LoRA (the run's r and alpha) to every layer it holds, and trains all of it with
  the task loss plus FedProx for ``local_steps`` steps, in bf16 like FedPETuning;
- the server averages each layer's LoRA over the clients that held it, weighted by their
  example counts (layer-wise FedAvg); a layer nobody drew keeps its global LoRA;
- the deliverable is the full model with every layer's global LoRA, evaluated in fp32.
Sent per round: each client's layers' LoRA down and up; its layers' weights once.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedsoda.evaluate.tasks import evaluate as evaluate_model
from fedsoda.methods.assignment import Assignment, capacities
from fedsoda.models import load
from fedsoda.models.loading import file_sha256
from fedsoda.surgery.layered import BASE, layer_file, layered_files, save_layered
from fedsoda.surgery.lora import LoraSpec, attach_lora, load_lora_state, lora_numel, lora_state
from fedsoda.surgery.plugback import export_peft
from fedsoda.surgery.quantize import dense_bytes


def draw_layers(seed: int, round_number: int, client: int, capacity: int, num_layers: int) -> tuple[int, ...]:
    """FedRA's allocation: ``capacity`` distinct layers in their original order."""
    rng = random.Random(zlib.crc32(json.dumps(["fedra", seed, round_number, client]).encode()))
    return tuple(sorted(rng.sample(range(num_layers), capacity)))


@dataclass
class FedRA:
    """A run's server side: the full model with LoRA on every layer, and the layer files."""

    model: nn.Module  # PEFT-wrapped full model (fp32) holding the global LoRA
    tokenizer: object
    folder: Path  # the layered client model files
    files: dict[str, tuple[str, Path]]
    capacity: list[int]
    lora: LoraSpec
    full_bf16_bytes: int
    num_layers: int


def prepare(cfg, out: Path, resume: bool) -> FedRA:
    full, tokenizer = load(cfg.model)
    total = full.config.num_hidden_layers
    capacity = capacities(cfg.client_layers, cfg.clients, total)
    folder = out / "clientmodel"
    if not (folder / BASE).exists():
        save_layered(full, folder.with_name("clientmodel.partial"), tokenizer)
        folder.with_name("clientmodel.partial").rename(folder)
    files = {name: (file_sha256(folder / name), folder / name)
             for name in layered_files(folder, range(total))}
    spec = LoraSpec()
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random: reproducibly
    model = attach_lora(full, list(range(total)), spec)
    return FedRA(model=model, tokenizer=tokenizer, folder=folder, files=files, capacity=capacity,
                 lora=spec, full_bf16_bytes=dense_bytes(full, 2), num_layers=total)


def initial_state(server: FedRA) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every layer's LoRA (B = 0); FedRA has no server-trained LoRA."""
    return lora_state(server.model, list(range(server.num_layers))), {}


def load_state(server: FedRA, state) -> None:
    load_lora_state(server.model, state.adapter)


def assign(server: FedRA, cfg, state, sampled: list[int]) -> dict[int, Assignment]:
    total = server.num_layers
    out = {}
    for pid in sampled:
        layers = draw_layers(cfg.seed, state.round + 1, pid, server.capacity[pid], total)
        out[pid] = Assignment(
            layers=layers, trainable=layers, kind="layers", quantization="bf16",
            files=tuple((name, server.files[name][0]) for name in layered_files(server.folder, layers)),
            local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, mu=cfg.mu)
    state.method["layers"] = {str(pid): list(a.layers) for pid, a in out.items()}
    return out


def after_round(server: FedRA, cfg, state) -> bool:
    load_state(server, state)
    return False  # nothing to realign


def evaluate(server: FedRA, task, rows: list[dict], data_dir: str | None) -> dict:
    return evaluate_model(server.model, server.tokenizer, task, rows, data_dir=data_dir)


def summary(server: FedRA, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """Export the adapter (every layer's LoRA); per capacity: trainable parameters, what a
    client holds and downloads, and its measured peak memory in a training step."""
    from fedsoda.accounting import client_peak_memory  # runs a probe process

    export_peft(server.model, out / "adapter")
    total = server.num_layers
    per_layer = lora_numel(server.model, [0])
    base_bytes = (server.folder / BASE).stat().st_size
    layer_bytes = (server.folder / layer_file(0)).stat().st_size
    by = {}
    for k in sorted(set(server.capacity)):
        layers = draw_layers(cfg.seed, 1, 0, k, total)  # any k layers: all have the same size
        by[str(k)] = {
            "clients": server.capacity.count(k), "trainable_params": k * per_layer,
            "client_model_bytes": base_bytes + k * layer_bytes + k * per_layer * 4,
            "client_peak_memory_bytes": client_peak_memory(
                server.folder, cfg.task, cfg.batch_size, cfg.max_tokens, cfg.data_folder,
                layers=layers)}
    largest = by[str(max(server.capacity))]
    return {"pruning": False, "pre_align": False, "realign": False, "accuracy_sub": None,
            "client_layers": cfg.client_layers or f"{total}x{cfg.clients}", "by_capacity": by,
            "trainable_params": largest["trainable_params"],
            "client_download_files": [server.files[n][1] for n in
                                      layered_files(server.folder, range(max(server.capacity)))],
            "client_model_bytes": largest["client_model_bytes"],
            "client_peak_memory_bytes": largest["client_peak_memory_bytes"],
            "full_model_bf16_bytes": server.full_bf16_bytes}
