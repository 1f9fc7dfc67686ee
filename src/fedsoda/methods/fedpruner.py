"""FedPruner: per-device layer-pruned sub-models sized to each device's memory budget (Wu et
al. 2025, "Memory-Efficient Federated Fine-Tuning of Large Language Models via Layer
Pruning", arXiv 2508.17209; method notes: ``../shared/papers/fedpruner-method.md``).

Algorithm (layer level, ``fedpruner.granularity = "layer"``; FedPruner+ below):
- budgets: client ``i`` has a memory budget ``M_i`` (``[fedpruner] budgets``); a memory model
  ``peak(k) = a + b*k`` fitted to two measured dry runs (``fedsoda.budgets``; at ``L/5`` and
  all ``L`` layers, the latter being the full-model peak that fractional budgets refer to)
  gives the most layers whose peak plus ``headroom`` fits, ``K_i`` (a measured point needs
  no headroom: a budget of ``1.0`` holds all ``L``); a budget under one layer is an error
  naming the least that works; the similarity probe's peak, measured once, must fit the
  smallest budget with the headroom;
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
FedPruner+ (``granularity = "block"``, method notes 2.7): the units are each layer's
attention and MLP blocks. Memory is ``a + b_A K^A + b_F K^F`` (``fedsoda.budgets.
BlockMemoryModel``, five dry runs: whole layers, MLP only and attention only at two sizes); the probe also
reports the CKA between the streams after every attention block and after every MLP block,
and each block's influence; for every ``K^A`` in ``0..L`` with the largest ``K^F`` that fits,
the attention units form ``K^A`` groups and the MLP units ``K^F`` groups (the configured
partition), one representative each by influence, and the pair whose representatives have
the largest summed influence is the client's: the layers holding any of them, each keeping
only its chosen blocks (the others are removed on the client, so memory really drops).
Sent per round: the global LoRA of every layer down for the probe, the CKA matrix and
influence up; the client's layers' LoRA down and up; the model's layer files once.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedsoda.budgets import BlockMemoryModel, MemoryModel, budgets_from_spec, calibrate, calibrate_blocks
from fedsoda.methods import layered
from fedsoda.methods.assignment import Assignment, ProbeRequest
from fedsoda.methods.layered import Layered, after_round, evaluate, initial_state, load_state
from fedsoda.surgery.blocks import units_to_blocks
from fedsoda.surgery.grouping import (
    contiguous_groups,
    select_representatives,
    selection_probabilities,
    spectral_groups,
)

__all__ = ["after_round", "assign", "evaluate", "initial_state", "load_state", "prepare",
           "probe_request", "selection_counts", "summary", "take_probes"]


CALIBRATION_KEYS = ("memory_model", "block_memory_model", "full_model_peak_bytes", "probe_peak_bytes")


def calibration(cfg, cached: Path, model_key: str) -> dict | None:
    """The measured memory model this run sizes its clients by: its own (``budgets.json``,
    a resumed run), else the one ``fedpruner.calibration`` names, else None (measure)."""
    if cached.exists():
        return json.loads(cached.read_text())
    if not cfg.fedpruner.calibration:
        return None
    given = json.loads(Path(cfg.fedpruner.calibration).read_text())
    if model_key not in given:
        raise ValueError(f"fedpruner.calibration {cfg.fedpruner.calibration} holds no {model_key} "
                         f"(it is from a {'FedPruner+' if model_key == 'memory_model' else 'FedPruner'} "
                         "run?); give a budgets.json of a run with the same granularity")
    return {key: given[key] for key in CALIBRATION_KEYS if key in given}


def budget_capacity(cfg, out: Path, total: int, folder: Path) -> tuple[list[int], dict]:
    """Layers per client from its budget, and the calibration (cached in ``budgets.json``, so
    a resumed run sizes its clients as before without measuring again). FedLoRA-exclusive
    sizes its clients by the same budgets and memory model."""
    if cfg.fedpruner.granularity == "block":
        return _block_capacity(cfg, out, total, folder)
    cached = out / "budgets.json"
    notes = calibration(cfg, cached, "memory_model")
    if notes is None:
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


def prepare_by_budgets(cfg, out: Path, to_capacity=None) -> Layered:
    """A layered server whose clients are sized by ``[fedpruner] budgets`` through
    ``budget_capacity`` (FedPruner, FedRA by budgets, FedLoRA-exclusive);
    ``to_capacity(layers, notes, total, folder)`` turns the layers each budget holds into the
    method's capacities (and may add to the notes). The calibration lands in
    ``server.notes`` for ``budget_figures``."""
    notes = {}

    def sized(total: int, folder: Path) -> list[int]:
        layers, found = budget_capacity(cfg, out, total, folder)  # calibrated, or budgets.json
        capacity = to_capacity(layers, found, total, folder) if to_capacity else layers
        notes.update(found)
        return capacity

    server = layered.prepare(cfg, out, sized)
    server.notes.update(notes)
    return server


def budget_figures(server: Layered, max_peak_over_budget: float) -> dict:
    """The summary's budget figures of a server from ``prepare_by_budgets``."""
    notes = server.notes
    return {"budgets_bytes": notes["budgets"], "memory_model": notes["memory_model"],
            "full_model_peak_bytes": notes["full_model_peak_bytes"],
            "client_layer_counts": list(server.capacity), "max_peak_over_budget": max_peak_over_budget}


def _block_capacity(cfg, out: Path, total: int, folder: Path) -> tuple[list[int], dict]:
    """FedPruner+: per client its feasible ``(K^A, K^F)`` pairs, from the block memory model
    (cached in ``budgets.json`` like the layer one); the capacity is the most layers any of
    its pairs can touch."""
    cached = out / "budgets.json"
    notes = calibration(cfg, cached, "block_memory_model")
    if notes is None:
        model = calibrate_blocks(folder, cfg.task, cfg.batch_size, cfg.max_tokens, cfg.data_folder)
        notes = {"block_memory_model": {"a": model.a, "b_attn": model.b_attn, "b_mlp": model.b_mlp,
                                        "points": model.points},
                 "full_model_peak_bytes": model.points[0][2]}
    budgets = budgets_from_spec(cfg.fedpruner.budgets, cfg.clients, notes["full_model_peak_bytes"])
    fitted = notes["block_memory_model"]
    model = BlockMemoryModel(a=fitted["a"], b_attn=fitted["b_attn"], b_mlp=fitted["b_mlp"],
                             points=tuple(map(tuple, fitted["points"])), headroom=cfg.fedpruner.headroom)
    pairs = [model.pairs_for(m, total) for m in budgets]  # an error below one block
    layers = [max(max(p) for p in mine) for mine in pairs]
    notes.update(budgets=budgets, layers=layers, unit_pairs=pairs)
    cached.write_text(json.dumps(notes, indent=1) + "\n")
    return layers, notes


def similarity_peak(cfg, out: Path, folder: Path, notes: dict) -> int:
    """The similarity probe's measured peak (cached in ``budgets.json``): every client runs
    it, so the smallest budget must hold it, with the same headroom as a training step."""
    if "probe_peak_bytes" not in notes:
        from fedsoda.accounting import similarity_peak_memory  # runs a probe process

        notes["probe_peak_bytes"] = similarity_peak_memory(
            folder, cfg.task, cfg.fedpruner.probe_samples, cfg.max_tokens, cfg.data_folder,
            units=cfg.fedpruner.granularity == "block", dtype=cfg.fedpruner.probe_dtype)
        (out / "budgets.json").write_text(json.dumps(notes, indent=1) + "\n")
    peak, smallest = notes["probe_peak_bytes"], min(notes["budgets"])
    if peak * (1 + cfg.fedpruner.headroom) > smallest:
        raise ValueError(f"fedpruner: the similarity probe on {cfg.fedpruner.probe_samples} "
                         f"examples peaks at {peak / 2**20:.1f} MiB, which with the "
                         f"{cfg.fedpruner.headroom:.0%} headroom the smallest budget "
                         f"({smallest / 2**20:.1f} MiB) cannot hold: lower "
                         "fedpruner.probe_samples or raise the smallest budget")
    return peak


def prepare(cfg, out: Path, resume: bool) -> Layered:
    def probe_fits(layers: list[int], notes: dict, total: int, folder: Path) -> list[int]:
        similarity_peak(cfg, out, folder, notes)  # into notes["probe_peak_bytes"], or an error
        return layers

    return prepare_by_budgets(cfg, out, probe_fits)


def probe_request(server: Layered, cfg, state) -> ProbeRequest | None:
    """Every ``reselect_every`` rounds (the first included): the similarity probe."""
    if state.round % cfg.fedpruner.reselect_every:
        return None
    return ProbeRequest(files=layered.files_of(server, range(server.num_layers)),
                        num_layers=server.num_layers, samples=cfg.fedpruner.probe_samples,
                        skip_first=cfg.fedpruner.skip_first,
                        units=cfg.fedpruner.granularity == "block", dtype=cfg.fedpruner.probe_dtype)


def take_probes(server: Layered, cfg, state,
                probes: list[tuple[int, torch.Tensor, torch.Tensor, int]]) -> None:
    """Average the clients' ``(client, CKA matrix, influence, examples)`` by example count."""
    if not probes:
        return  # keep the last round's similarity (none yet: assign says so)
    total = float(sum(n for *_, n in probes))
    similarity = sum(s.double() * (n / total) for _, s, _, n in probes)
    influence = sum(i.double() * (n / total) for _, _, i, n in probes)
    probed = sorted(p for p, *_ in probes)
    state.method.update(similarity=similarity.tolist(), influence=influence.tolist(),
                        probed_round=state.round + 1, probed_clients=probed)
    state.method.setdefault("probe_history", {})[str(state.round + 1)] = probed


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
    if cfg.fedpruner.granularity == "block":
        return _assign_blocks(server, cfg, state, sampled)
    similarity = np.array(state.method["similarity"])
    influence = state.method["influence"]
    chosen, groups_by_k = {}, {}
    for pid in sampled:
        k = server.capacity[pid]
        if k not in groups_by_k:
            groups_by_k[k] = groups_for(cfg, similarity, k)
        groups = groups_by_k[k]
        probabilities = selection_probabilities(influence, groups)
        rng = _client_rng(cfg, state, pid)
        chosen[pid] = tuple(sorted(select_representatives(probabilities, groups,
                                                          mode=cfg.fedpruner.selection, rng=rng)))
    state.method["groups"] = {str(k): g for k, g in sorted(groups_by_k.items())}
    state.method["layers"] = {str(pid): list(layers) for pid, layers in chosen.items()}
    state.method.setdefault("history", {})[str(state.round + 1)] = state.method["layers"]
    return {pid: layered.assignment(server, cfg, layers) for pid, layers in chosen.items()}


def _client_rng(cfg, state, pid: int) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(json.dumps([cfg.seed, state.round + 1, pid]).encode()))


def _assign_blocks(server: Layered, cfg, state, sampled: list[int]) -> dict[int, Assignment]:
    """FedPruner+: per client the ``(K^A, K^F)`` pair whose representative units have the
    largest summed influence; its layers keep only their chosen blocks."""
    similarity = np.array(state.method["similarity"])  # [3, L, L]: layers, attention, MLP
    influence = np.array(state.method["influence"])  # [3, L]
    groups = {}  # (kind, k) -> partition, shared by the clients of a round
    chosen = {}
    for pid in sampled:
        rng, best = _client_rng(cfg, state, pid), None
        for pair in server.notes["unit_pairs"][pid]:
            units = []
            for kind, block, k in ((1, "attn", pair[0]), (2, "mlp", pair[1])):
                if k == 0:
                    continue
                if (kind, k) not in groups:
                    groups[kind, k] = groups_for(cfg, similarity[kind], k)
                probabilities = selection_probabilities(influence[kind], groups[kind, k])
                units += [(layer, block) for layer in select_representatives(
                    probabilities, groups[kind, k], mode=cfg.fedpruner.selection, rng=rng)]
            score = sum(influence[1 if block == "attn" else 2][layer] for layer, block in units)
            if best is None or score > best[0]:  # ties: the pair with fewer attention blocks
                best = (score, units)
        chosen[pid] = units_to_blocks(best[1])
    state.method["groups"] = {f"{'attn' if kind == 1 else 'mlp'}{k}": g
                              for (kind, k), g in sorted(groups.items())}
    state.method["layers"] = {str(pid): list(layers) for pid, (layers, _) in chosen.items()}
    state.method["blocks"] = {str(pid): list(blocks) for pid, (_, blocks) in chosen.items()}
    state.method.setdefault("history", {})[str(state.round + 1)] = state.method["layers"]
    state.method.setdefault("block_history", {})[str(state.round + 1)] = state.method["blocks"]
    return {pid: replace(layered.assignment(server, cfg, layers), blocks=blocks)
            for pid, (layers, blocks) in chosen.items()}


def summary(server: Layered, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """The shared layered figures; per round and client its budget, layers (and blocks) and
    the measured peak of its training step and of the similarity probe; the largest
    peak/budget ratio seen; how often each layer (unit) was chosen."""
    block = cfg.fedpruner.granularity == "block"
    # FedPruner+ clients train block sub-models, measured below: the layered summary's
    # whole-layer peaks would be minutes of probes nobody reads.
    own = layered.summary(server, cfg, out, measure_peaks=not block)
    notes, history = server.notes, state.method.get("history", {})
    blocks = state.method.get("block_history", {})
    if block:
        peaks = _block_peaks(server, cfg, history, blocks)
    else:
        peaks = {(int(k),): f["client_peak_memory_bytes"] for k, f in own["by_capacity"].items()}
    by_round = _clients_by_round(notes, history, blocks, peaks, state.method.get("probe_history", {}))
    worst = max((e["peak_over_budget"] for r in by_round.values() for e in r.values()), default=0.0)
    extra = {"memory_model": notes.get("memory_model")}
    if block:
        _fill_block_peaks(server, own, by_round)
        units = [selection_counts(by_round, server.num_layers, b).sum(axis=1) for b in ("attn", "mlp")]
        extra = {"granularity": "block", "block_memory_model": notes["block_memory_model"],
                 "unit_pairs": notes["unit_pairs"],
                 "unit_selections": np.stack(units, axis=1).tolist()}  # [layer, (attn, mlp)]
    return {**own, "budgets_bytes": notes["budgets"], "client_layer_counts": notes["layers"],
            "full_model_peak_bytes": notes["full_model_peak_bytes"],
            "probe_peak_bytes": notes["probe_peak_bytes"], **extra, "clients_by_round": by_round,
            "max_peak_over_budget": worst,
            "layer_selections": selection_counts(by_round, server.num_layers).sum(axis=1).tolist(),
            "groups": state.method.get("groups", {}),
            # The last averaged CKA matrix ([3, L, L] for FedPruner+: layers, attention, MLP).
            "similarity": state.method.get("similarity")}


def _clients_by_round(notes: dict, history: dict, blocks: dict, peaks: dict,
                      probe_history: dict) -> dict:
    """Per round and client: its budget, layers (and blocks), the measured peak of its
    training step and, in rounds it ran the probe, of the probe; the larger over the budget."""
    by_round = {}
    for number, round_layers in history.items():
        by_round[number] = {}
        for pid, layers in round_layers.items():
            budget = notes["budgets"][int(pid)]
            entry = {"budget_bytes": budget, "layers": layers,
                     "peak_bytes": peaks[_shape(layers, blocks.get(number, {}).get(pid))]}
            if number in blocks:
                entry["blocks"] = blocks[number][pid]
            if int(pid) in probe_history.get(number, []):
                entry["probe_peak_bytes"] = notes["probe_peak_bytes"]
            entry["peak_over_budget"] = max(entry["peak_bytes"], entry.get("probe_peak_bytes", 0)) / budget
            by_round[number][pid] = entry
    return by_round


def selection_counts(clients_by_round: dict, num_layers: int, block: str | None = None) -> np.ndarray:
    """``[layer, round]``: how many of the round's clients held each layer (with ``block``,
    "attn" or "mlp", kept that block of it), from a summary's ``clients_by_round``. Here, not
    in the report, so that the summary's totals and the report's picture count alike."""
    counts = np.zeros((num_layers, max(map(int, clients_by_round), default=0)), dtype=int)
    for number, clients in clients_by_round.items():
        for entry in clients.values():
            kept = entry.get("blocks") or ["attn+mlp"] * len(entry["layers"])
            for layer, keep in zip(entry["layers"], kept, strict=True):
                counts[layer, int(number) - 1] += block is None or block in keep
    return counts


def _shape(layers: list[int], blocks: list[str] | None) -> tuple:
    """What a training step's peak depends on: the layer count, or FedPruner+'s counts of
    attention and MLP blocks (every layer of a model has the same size)."""
    if blocks is None:
        return (len(layers),)
    return (sum("attn" in b for b in blocks), sum("mlp" in b for b in blocks))


def _block_peaks(server: Layered, cfg, history: dict, blocks: dict) -> dict:
    """FedPruner+: the measured training-step peak of every ``(K^A, K^F)`` the run used, one
    fresh-process measurement on the first sub-model of that shape (its blocks dropped, as
    the client builds it); a shape the calibration measured keeps that measurement
    (``layered.calibrated_peaks``)."""
    from fedsoda.accounting import client_peak_memory  # runs a probe process

    peaks = layered.calibrated_peaks(server.notes)
    for number, round_layers in sorted(history.items(), key=lambda item: int(item[0])):
        for pid, layers in sorted(round_layers.items()):
            shape = _shape(layers, blocks[number][pid])
            if shape not in peaks:
                peaks[shape] = client_peak_memory(server.folder, cfg.task, cfg.batch_size,
                                                  cfg.max_tokens, cfg.data_folder, layers=layers,
                                                  blocks=blocks[number][pid])
    return peaks


def _fill_block_peaks(server: Layered, own: dict, by_round: dict) -> None:
    """FedPruner+: the layered figures' peaks from the block sub-models really trained, so
    the comparison reads them as for whole layers: per capacity the largest of its clients'
    sub-models, at the top the largest of all. A capacity whose clients were never sampled
    trained nothing to measure and is left out (the comparison reads the capacities there)."""
    largest = {}
    for clients in by_round.values():
        for pid, entry in clients.items():
            k = str(server.capacity[int(pid)])
            largest[k] = max(largest.get(k, 0), entry["peak_bytes"])
    own["by_capacity"] = {k: {**figures, "client_peak_memory_bytes": largest[k]}
                          for k, figures in own["by_capacity"].items() if k in largest}
    own["client_peak_memory_bytes"] = max(largest.values())
