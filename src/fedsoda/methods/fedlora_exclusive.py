"""FedLoRA-exclusive: full-model LoRA where only the clients whose memory budget holds the
full model take part (the memory-aware baseline of FedPruner's comparison, method notes 3;
FedRA's "exclusive learning").

Algorithm (one global round):
- budgets: client ``i`` has the memory budget ``M_i`` of ``[fedpruner] budgets``, sized by
  FedPruner's memory model (the same two measured dry runs, ``fedpruner.budget_capacity``);
  a client takes part only if its budget holds all ``L`` layers, i.e. it is at or above the
  measured full-model peak (a budget of ``1.0``) or the model predicts ``L`` layers fit;
- the round samples clients as every other method does (same seed, same clients); a sampled
  client whose budget is too small sits the round out, so a round may train nobody, and the
  global LoRA then stays as it was;
- each taking part trains LoRA on every layer of the full model (task loss + FedProx, AdamW,
  bf16 weights as FedPETuning), replies with it; FedAvg over them (layer-wise FedAvg with
  every layer held is FedAvg);
- the deliverable is the full model with the global LoRA, exported as PEFT.
It is today's FedPETuning restricted to the clients that could run it, on the layered client
model that FedPruner and FedRA use, so the three differ only in who trains which layers.
Sent per round: the full LoRA down and up to each taking part; the model's files once.
"""

from __future__ import annotations

from pathlib import Path

from fedsoda.methods import layered
from fedsoda.methods.assignment import Assignment
from fedsoda.methods.fedpruner import budget_figures, prepare_by_budgets
from fedsoda.methods.layered import Layered, after_round, evaluate, initial_state, load_state

__all__ = ["after_round", "assign", "evaluate", "initial_state", "load_state", "prepare", "summary"]


def prepare(cfg, out: Path, resume: bool) -> Layered:
    """Every client's capacity is ``L`` if its budget holds the full model, else 0."""
    return prepare_by_budgets(cfg, out, _whole_model_only)


def _whole_model_only(layers: list[int], notes: dict, total: int, folder: Path) -> list[int]:
    """Capacity ``total`` for the clients whose budget holds every layer, 0 for the rest."""
    eligible = [k if k == total else 0 for k in layers]
    if not any(eligible):
        smallest = notes["full_model_peak_bytes"] / 2**20
        raise ValueError(f"fedlora_exclusive: no client's budget holds the full model "
                         f"({smallest:.1f} MiB measured); give at least one client a budget "
                         f"of 1.0 in fedpruner.budgets")
    return eligible


def assign(server: Layered, cfg, state, sampled: list[int]) -> dict[int, Assignment]:
    """The sampled clients that can hold the full model train all of it; the rest sit out."""
    everything = tuple(range(server.num_layers))
    taking_part = [pid for pid in sampled if server.capacity[pid] == server.num_layers]
    state.method["layers"] = {str(pid): list(everything) for pid in taking_part}
    state.method.setdefault("history", {})[str(state.round + 1)] = sorted(taking_part)
    return {pid: layered.assignment(server, cfg, everything) for pid in taking_part}


def summary(server: Layered, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """The layered figures for the full model, the clients that could take part, how many
    rounds trained nobody, and the full model's measured peak against the least budget
    that took part."""
    own = layered.summary(server, cfg, out)
    notes = server.notes
    eligible = [pid for pid, k in enumerate(server.capacity) if k]
    peak = own["by_capacity"][str(server.num_layers)]["client_peak_memory_bytes"]
    history = state.method.get("history", {})
    return {**own, **budget_figures(server, peak / min(notes["budgets"][pid] for pid in eligible)),
            "eligible_clients": eligible,
            "rounds_without_training": sum(1 for pids in history.values() if not pids)}
