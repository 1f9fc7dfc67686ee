"""FedRA: random allocation of layer subsets to heterogeneous clients (Su et al. 2023, "FedRA:
A Random Allocation Strategy for Federated Tuning to Unleash the Power of Heterogeneous
Clients").

Algorithm (one global round):
- client ``i`` can hold ``K_i`` of the full model's ``L`` decoder layers (its capacity, from
  ``client_layers`` in the config, e.g. ``"6x4,12x4,30x2"``; empty: every client holds all;
  ``"budgets"``: the most layers its ``[fedpruner] budgets`` memory budget holds, by
  FedPruner's measured memory model, so that FedRA and FedPruner compare at the same budgets);
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
from pathlib import Path

from fedsoda.methods import layered
from fedsoda.methods.assignment import BY_BUDGETS, Assignment, capacities
from fedsoda.methods.fedpruner import budget_figures, prepare_by_budgets
from fedsoda.methods.layered import Layered, after_round, evaluate, initial_state, load_state

__all__ = ["after_round", "assign", "evaluate", "initial_state", "load_state", "prepare", "summary"]


def draw_layers(seed: int, round_number: int, client: int, capacity: int, num_layers: int) -> tuple[int, ...]:
    """FedRA's allocation: ``capacity`` distinct layers in their original order."""
    rng = random.Random(zlib.crc32(json.dumps(["fedra", seed, round_number, client]).encode()))
    return tuple(sorted(rng.sample(range(num_layers), capacity)))


def prepare(cfg, out: Path, resume: bool) -> Layered:
    if cfg.client_layers.strip() != BY_BUDGETS:
        return layered.prepare(cfg, out, lambda total, _: capacities(cfg.client_layers, cfg.clients, total))
    return prepare_by_budgets(cfg, out)


def assign(server: Layered, cfg, state, sampled: list[int]) -> dict[int, Assignment]:
    """A fresh random draw of each sampled client's layers (kept in the checkpointed state)."""
    out = {pid: layered.assignment(server, cfg, draw_layers(
        cfg.seed, state.round + 1, pid, server.capacity[pid], server.num_layers)) for pid in sampled}
    state.method["layers"] = {str(pid): list(a.layers) for pid, a in out.items()}
    return out


def summary(server: Layered, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """The layered figures; sized by budgets, also the budgets, the memory model and the
    largest peak/budget (a client's peak is that of its layer count: every layer has the
    same size, so which layers it drew does not change it)."""
    own = layered.summary(server, cfg, out)
    figures = {**own, "client_layers": cfg.client_layers or f"{server.num_layers}x{cfg.clients}"}
    if "budgets" not in server.notes:
        return figures
    by = own["by_capacity"]
    worst = max(by[str(k)]["client_peak_memory_bytes"] / budget
                for k, budget in zip(server.capacity, server.notes["budgets"], strict=True))
    return {**figures, **budget_figures(server, worst)}
