"""The server side every layer-subset method shares (FedRA, FedPruner): the full model with
LoRA on every layer, stored for clients one file per layer, and what a client of ``k``
layers holds, downloads and needs in memory.

Method modules take their ``initial_state``, ``load_state``, ``after_round`` and
``evaluate`` from here and say themselves how many layers each client holds and which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fedsoda.budgets import spread_layers
from fedsoda.evaluate.tasks import evaluate as evaluate_model
from fedsoda.methods.assignment import Assignment
from fedsoda.models import load
from fedsoda.models.loading import file_sha256
from fedsoda.surgery.layered import BASE, layer_file, layered_files, save_layered
from fedsoda.surgery.lora import LoraSpec, attach_lora, load_lora_state, lora_numel, lora_state
from fedsoda.surgery.plugback import export_peft
from fedsoda.surgery.quantize import dense_bytes


@dataclass
class Layered:
    """A run's server side: the full model holding the global LoRA, and the layer files."""

    model: nn.Module  # PEFT-wrapped full model (fp32) with LoRA on every layer
    tokenizer: object
    folder: Path  # the layered client model files
    files: dict[str, tuple[str, Path]]  # file name -> (sha256, path)
    capacity: list[int]  # layers each client holds
    lora: LoraSpec
    full_bf16_bytes: int
    num_layers: int
    notes: dict = field(default_factory=dict)  # a method's own figures for the summary


def prepare(cfg, out: Path, capacity: Callable[[int, Path], list[int]]) -> Layered:
    """Load the full model, write its layer files once (``out/clientmodel``), put LoRA on
    every layer; ``capacity(num_layers, folder)`` gives the layers each client holds."""
    full, tokenizer = load(cfg.model)
    total = full.config.num_hidden_layers
    folder = out / "clientmodel"
    if not (folder / BASE).exists():
        save_layered(full, folder.with_name("clientmodel.partial"), tokenizer)
        folder.with_name("clientmodel.partial").rename(folder)
    held = capacity(total, folder)
    files = {name: (file_sha256(folder / name), folder / name)
             for name in layered_files(folder, range(total))}
    spec = LoraSpec()
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random: reproducibly
    model = attach_lora(full, list(range(total)), spec)
    return Layered(model=model, tokenizer=tokenizer, folder=folder, files=files, capacity=held,
                   lora=spec, full_bf16_bytes=dense_bytes(full, 2), num_layers=total)


def initial_state(server: Layered) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every layer's LoRA (B = 0); no server-trained LoRA."""
    return lora_state(server.model, list(range(server.num_layers))), {}


def load_state(server: Layered, state) -> None:
    load_lora_state(server.model, state.adapter)


def after_round(server: Layered, cfg, state) -> bool:
    load_state(server, state)
    return False  # nothing to realign


def evaluate(server: Layered, task, rows: list[dict], data_dir: str | None) -> dict:
    """The deliverable: the full model with every layer's global LoRA."""
    return evaluate_model(server.model, server.tokenizer, task, rows, data_dir=data_dir)


def files_of(server: Layered, layers) -> tuple[tuple[str, str], ...]:
    """(name, sha256) of what a client holding ``layers`` needs."""
    return tuple((name, server.files[name][0]) for name in layered_files(server.folder, layers))


def assignment(server: Layered, cfg, layers: tuple[int, ...]) -> Assignment:
    """A client holding ``layers`` (full-model indices) and training LoRA on all of them."""
    return Assignment(layers=layers, trainable=layers, kind="layers", quantization="bf16",
                      files=files_of(server, layers), local_steps=cfg.local_steps,
                      batch_size=cfg.batch_size, lr=cfg.lr, mu=cfg.mu)


def summary(server: Layered, cfg, out: Path, measure_peaks: bool = True) -> dict:
    """Export the adapter (every layer's LoRA); per number of layers held: trainable
    parameters, what a client holds, and its measured peak memory in a training step.

    Each peak is a fresh-process training step (minutes on a real model), except for a layer
    count the run's memory calibration measured (``calibrated_peaks``). A caller whose
    clients train other shapes (FedPruner+'s block sub-models) passes ``measure_peaks=False``
    and fills ``client_peak_memory_bytes`` in, at the top and per layer count, itself."""
    from fedsoda.accounting import client_peak_memory  # runs a probe process

    export_peft(server.model, out / "adapter")
    per_layer = lora_numel(server.model, [0])
    base_bytes = (server.folder / BASE).stat().st_size
    layer_bytes = (server.folder / layer_file(0)).stat().st_size
    known, by = calibrated_peaks(server.notes), {}
    for k in sorted(set(server.capacity) - {0}):  # 0: a client that never takes part
        by[str(k)] = {
            "clients": server.capacity.count(k), "trainable_params": k * per_layer,
            "client_model_bytes": base_bytes + k * layer_bytes + k * per_layer * 4}
        if measure_peaks and (k,) in known:
            by[str(k)]["client_peak_memory_bytes"] = known[(k,)]
        elif measure_peaks:  # any k layers (every layer has the same size), as calibrated
            by[str(k)]["client_peak_memory_bytes"] = client_peak_memory(
                server.folder, cfg.task, cfg.batch_size, cfg.max_tokens, cfg.data_folder,
                layers=spread_layers(k, server.num_layers))
    largest = by[str(max(server.capacity))]
    figures = {"pruning": False, "pre_align": False, "realign": False, "accuracy_sub": None,
               "by_capacity": by, "trainable_params": largest["trainable_params"],
               "client_download_files": [server.files[n][1] for n in
                                         layered_files(server.folder, range(max(server.capacity)))],
               "client_model_bytes": largest["client_model_bytes"],
               "full_model_bf16_bytes": server.full_bf16_bytes}
    if measure_peaks:
        figures["client_peak_memory_bytes"] = largest["client_peak_memory_bytes"]
    return figures


def calibrated_peaks(notes: dict) -> dict[tuple[int, ...], int]:
    """The training-step peaks a run's memory calibration measured (``server.notes``), by
    client-model shape: ``(k,)`` for ``k`` whole layers, ``(K^A, K^F)`` for a FedPruner+
    block sub-model. A summary keeps these rather than measuring the shape again: the full
    model's defines the fractional budgets, and a second measurement would set a 100%
    client against the run-to-run spread of the same step."""
    layers = (notes.get("memory_model") or {}).get("points", ())
    blocks = (notes.get("block_memory_model") or {}).get("points", ())
    return {**{(k,): peak for k, peak in layers},
            **{(k_attn, k_mlp): peak for k_attn, k_mlp, peak in blocks}}
