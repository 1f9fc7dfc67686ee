"""FedPruner: per-device layer-pruned sub-models sized to each device's memory budget (Wu et
al. 2025, "Memory-Efficient Federated Fine-Tuning of Large Language Models via Layer
Pruning", arXiv 2508.17209; method notes: ``../shared/papers/fedpruner-method.md``).

Algorithm (layer level; FedPruner+ is not built yet):
- budgets: client ``i`` has a memory budget ``M_i`` (``[fedpruner] budgets``); a memory model
  ``peak(k) = a + b*k`` fitted to two measured dry runs (``fedsoda.budgets``; at ``L/5`` and
  all ``L`` layers, the latter being the full-model peak that fractional budgets refer to)
  gives the most layers whose peak plus ``headroom`` fits, ``K_i``; a budget under one layer
  is an error naming the least that works;
- every ``reselect_every`` rounds (default 1), each sampled client runs the current global
  model (base weights and global LoRA), one layer at a time so its budget holds, on a seeded
  batch of its own data, and reports the linear CKA between all layer outputs (each sample's
  first token left out: SmolLM2's attention sink otherwise makes every layer look alike) and
  each layer's block influence ``1 - cos(input, output)``;
- macro (FDLO): the server averages the clients' matrices by example count and partitions the
  layers into ``K_i`` groups: spectral partitioning of the layer graph's Laplacian
  ``L = D - W`` (default) or contiguous optimal segmentation (exact DP);
- micro (IALS): within each group, selection probabilities from the averaged influence; one
  representative layer per group (argmax by default, or sampled), kept in model order;
- the client trains LoRA on its ``K_i`` layers (task loss + FedProx, AdamW), replies under
  full-model names; the server averages layer-wise (a layer nobody held keeps its LoRA);
- the deliverable is the full model with every layer's global LoRA, exported as PEFT.
Sent per round: the global LoRA of every layer down for the probe, the CKA matrix and
influence up; the client's layers' LoRA down and up; the model's layer files once.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from fedsoda.budgets import MemoryModel, budgets_from_spec, calibrate
from fedsoda.methods import layered
from fedsoda.methods.assignment import Assignment, ProbeRequest
from fedsoda.methods.layered import Layered, after_round, evaluate, initial_state, load_state
from fedsoda.surgery.grouping import (
    contiguous_groups,
    select_representatives,
    selection_probabilities,
    spectral_groups,
)

__all__ = ["after_round", "assign", "evaluate", "initial_state", "load_state", "prepare",
           "probe_request", "summary", "take_probes"]


def _capacity(cfg, out: Path, total: int, folder: Path) -> tuple[list[int], dict]:
    """Layers per client from its budget, and the calibration (cached in ``budgets.json``, so
    a resumed run sizes its clients as before without measuring again)."""
    cached = out / "budgets.json"
    if cached.exists():
        notes = json.loads(cached.read_text())
    else:
        # Dry runs at L/5 layers and at all L: the second is the full-model peak that
        # fractional budgets refer to.
        model = calibrate(folder, cfg.task, cfg.batch_size, cfg.max_tokens, cfg.data_folder)
        notes = {"memory_model": {"a": model.a, "b": model.b, "points": model.points},
                 "full_model_peak_bytes": model.points[-1][1]}
    budgets = budgets_from_spec(cfg.fedpruner.budgets, cfg.clients, notes["full_model_peak_bytes"])
    fitted = notes["memory_model"]
    # Headroom: the same dry run moves by 10-25 MiB between processes (bench/budgets_smollm2.json).
    model = MemoryModel(a=fitted["a"], b=fitted["b"], source="measured",
                        points=tuple(map(tuple, fitted["points"])), headroom=cfg.fedpruner.headroom)
    layers = [model.layers_for(m, total) for m in budgets]  # an error below one layer
    notes.update(budgets=budgets, layers=layers)
    cached.write_text(json.dumps(notes, indent=1) + "\n")
    return layers, notes


def prepare(cfg, out: Path, resume: bool) -> Layered:
    notes = {}

    def capacity(total: int, folder: Path) -> list[int]:
        layers, found = _capacity(cfg, out, total, folder)
        notes.update(found)
        return layers

    server = layered.prepare(cfg, out, capacity)
    server.notes.update(notes)
    return server


def probe_request(server: Layered, cfg, state) -> ProbeRequest | None:
    """Every ``reselect_every`` rounds (the first included): the similarity probe."""
    if state.round % cfg.fedpruner.reselect_every:
        return None
    return ProbeRequest(files=layered.files_of(server, range(server.num_layers)),
                        num_layers=server.num_layers, samples=cfg.fedpruner.probe_samples,
                        skip_first=cfg.fedpruner.skip_first)


def take_probes(server: Layered, cfg, state,
                probes: list[tuple[int, torch.Tensor, torch.Tensor, int]]) -> None:
    """Average the clients' ``(client, CKA matrix, influence, examples)`` by example count."""
    if not probes:
        return  # keep the last round's similarity (none yet: assign says so)
    total = float(sum(n for *_, n in probes))
    similarity = sum(s.double() * (n / total) for _, s, _, n in probes)
    influence = sum(i.double() * (n / total) for _, _, i, n in probes)
    state.method.update(similarity=similarity.tolist(), influence=influence.tolist(),
                        probed_round=state.round + 1, probed_clients=sorted(p for p, *_ in probes))


def groups_for(cfg, similarity: np.ndarray, k: int) -> list[list[int]]:
    """FDLO: ``k`` groups of layers by the configured partition."""
    if cfg.fedpruner.grouping == "contiguous":
        return contiguous_groups(similarity, k)
    return spectral_groups(similarity, k, seed=cfg.seed)


def assign(server: Layered, cfg, state, sampled: list[int]) -> dict[int, Assignment]:
    """Each client's sub-model: one representative layer per group, ``K_i`` groups."""
    if "similarity" not in state.method:
        raise RuntimeError("FedPruner has no layer similarity yet: no client answered the "
                           "probe (see the rejected replies in the log)")
    similarity = np.array(state.method["similarity"])
    influence = state.method["influence"]
    chosen, groups_by_k = {}, {}
    for pid in sampled:
        k = server.capacity[pid]
        if k not in groups_by_k:
            groups_by_k[k] = groups_for(cfg, similarity, k)
        groups = groups_by_k[k]
        probabilities = selection_probabilities(influence, groups)
        rng = np.random.default_rng(zlib.crc32(json.dumps([cfg.seed, state.round + 1, pid]).encode()))
        chosen[pid] = tuple(sorted(select_representatives(probabilities, groups,
                                                          mode=cfg.fedpruner.selection, rng=rng)))
    state.method["groups"] = {str(k): g for k, g in sorted(groups_by_k.items())}
    state.method["layers"] = {str(pid): list(layers) for pid, layers in chosen.items()}
    state.method.setdefault("history", {})[str(state.round + 1)] = state.method["layers"]
    return {pid: layered.assignment(server, cfg, layers) for pid, layers in chosen.items()}


def summary(server: Layered, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """The shared layered figures, plus each client's budget and layers and, per layer count,
    the measured peak against the smallest budget that got it."""
    own = layered.summary(server, cfg, out)
    notes = server.notes
    ratios = {}
    for k, figures in own["by_capacity"].items():
        budgets = [m for m, n in zip(notes["budgets"], notes["layers"], strict=True) if str(n) == k]
        figures["smallest_budget_bytes"] = min(budgets)
        ratios[k] = figures["client_peak_memory_bytes"] / min(budgets)
    counts = np.zeros(server.num_layers, dtype=int)
    for round_layers in state.method.get("history", {}).values():
        for layers in round_layers.values():
            counts[layers] += 1
    return {**own, "budgets_bytes": notes["budgets"], "client_layer_counts": notes["layers"],
            "memory_model": notes["memory_model"], "full_model_peak_bytes": notes["full_model_peak_bytes"],
            "max_peak_over_budget": max(ratios.values()), "layer_selections": counts.tolist(),
            "groups": state.method.get("groups", {})}
