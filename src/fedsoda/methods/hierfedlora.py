"""HierFedLoRA: hierarchical FedLoRA with near-IID groups, a per-group intra-group
aggregation frequency and a per-group fine-tuning depth, chosen jointly (Liu, Liao, Xu, Xu
2025, arXiv 2503.21213). Only the abstract could be read; every step below is the method
notes' reconstruction (``hierfedlora-method.md``), each alternative a ``[hierfedlora]`` setting.

Algorithm:
- handshake: each device declares its label histogram (the task's partition key; optional
  Laplace noise); the server forms ``M`` groups whose pooled label mixes are closest to the
  global one (min-max KL: greedy, then pairwise swaps; ``fedsoda.data.groups``). Each device
  gets a simulated tier (speed relative to this machine, link bandwidth);
- cost model: a training step at every candidate depth is measured on this machine for the
  real model (fresh process; step seconds and peak memory); a device's step takes that over
  its speed, its LoRA of ``d`` layers moves down and up at its bandwidth;
- every global round: the server solves for each group's ``(tau_m, d_m)`` (rate-maximising
  under a common deadline, exactly on the grid; ``fedsoda.schedule``) from an exponential
  average of the device speeds seen so far; then group ``m`` runs ``tau_m`` intra-group
  rounds: every member trains the LoRA of the top ``d_m`` layers (nothing below them has
  LoRA or gradient) for ``local_steps`` steps from the group's LoRA (task loss + FedProx,
  AdamW, bf16 weights), the group averages by example count (on the server, logically per
  group; each member's LoRA travels down and up every intra-group round);
- the server merges the groups layer-wise, each layer over the groups that trained it,
  weighted by their examples (option: times tau); the simulated clock advances by the
  slowest group's ``tau_m`` round times at this round's device speeds;
- the deliverable is the full model with every layer's global LoRA, exported as PEFT.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsoda.aggregation import layerwise_fedavg
from fedsoda.data.groups import near_iid_groups, noisy_histograms, random_groups
from fedsoda.methods import layered
from fedsoda.methods.assignment import Assignment
from fedsoda.methods.hier_settings import parse_tiers
from fedsoda.methods.layered import Layered, after_round, evaluate, initial_state, load_state
from fedsoda.models import cache_dir
from fedsoda.schedule import (
    depth_grid,
    device_depth,
    device_tiers,
    round_speeds,
    round_times,
    solve,
    tau_caps,
)
from fedsoda.surgery.lora import lora_numel

__all__ = ["after_round", "evaluate", "initial_state", "load_state", "meet_clients", "merge",
           "plan_groups", "prepare", "round_done", "summary"]


@dataclass(frozen=True)
class GroupPlan:
    """One group's part of a global round: its members' assignments, its intra-group rounds."""

    members: tuple[int, ...]
    tau: int
    assignments: dict[int, Assignment] = field(hash=False)

    @property
    def layers(self) -> tuple[int, ...]:
        """Full-model layers any member trains: what the group's LoRA holds."""
        return tuple(sorted({i for a in self.assignments.values() for i in a.trainable}))


def candidate_depths(cfg, num_layers: int) -> tuple[int, ...]:
    """The depths the solver chooses among (``depth`` setting)."""
    depth = cfg.hierfedlora.depth
    if depth in ("auto", "device"):
        return depth_grid(num_layers, every=cfg.hierfedlora.depth_grid == "every")
    fixed = num_layers if depth == "full" else int(depth)
    if fixed > num_layers:
        raise ValueError(f"hierfedlora.depth {fixed} exceeds the model's {num_layers} layers")
    return (fixed,)


def prepare(cfg, out: Path, resume: bool) -> Layered:
    """The layered full model (every device holds all of it) and the measured costs."""
    server = layered.prepare(cfg, out, lambda total, _: [total] * cfg.clients)
    depths = candidate_depths(cfg, server.num_layers)
    server.notes["costs"] = depth_costs(cfg, server, depths)
    (out / "timings.json").write_text(json.dumps(server.notes["costs"], indent=1) + "\n")
    server.notes["layer_bytes"] = 4 * lora_numel(server.model, [0])  # fp32 on the wire
    return server


def depth_costs(cfg, server: Layered, depths) -> dict:
    """``{depth: {"step_seconds", "peak_bytes"}}``: given (``hierfedlora.timings``), or
    measured once per machine, model and data shape and kept in the model cache, so that
    every method of a comparison runs on the same cost model."""
    given = cfg.hierfedlora.timings
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"hierfedlora.timings: {path} does not exist; give a run "
                                    "folder's timings.json or leave it empty to measure")
        costs = json.loads(path.read_text())
        lacking = [d for d in depths if str(d) not in costs]
        if lacking:
            raise ValueError(f"hierfedlora.timings: {path} has no figures for depths {lacking}")
        return {str(d): costs[str(d)] for d in depths}
    from fedsoda.accounting import depth_cost  # runs a probe process per depth

    hashes = sorted(h for h, _ in server.files.values())
    key = hashlib.sha256(json.dumps([hashes, cfg.task, cfg.batch_size, cfg.max_tokens]).encode())
    cached = cache_dir() / "timings" / f"{key.hexdigest()[:16]}.json"
    costs = json.loads(cached.read_text()) if cached.is_file() else {}
    for d in depths:
        if str(d) not in costs:
            costs[str(d)] = depth_cost(server.folder, cfg.task, cfg.batch_size, cfg.max_tokens,
                                       cfg.data_folder, d)
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(costs, indent=1) + "\n")
    return {str(d): costs[str(d)] for d in depths}


def meet_clients(server: Layered, cfg, state, declared: dict[int, int],
                 labels: dict[int, dict[int, int]]) -> None:
    """Form the groups from the declared label histograms of the clients that hold examples
    and deal the device tiers (once: a resumed run keeps what it had)."""
    if "groups" in state.method:
        return
    settings = cfg.hierfedlora
    # A device with no examples (strong Dirichlet skew leaves some empty) has nothing to
    # train: it joins no group, as a real device without local data would sit out.
    active = [pid for pid in range(cfg.clients) if declared[pid] > 0]
    if len(active) < settings.groups:
        raise ValueError(f"only {len(active)} of {cfg.clients} clients hold examples under "
                         f"partition {cfg.partition}: set hierfedlora.groups <= {len(active)} "
                         "or use a larger Dirichlet beta")
    keys = sorted({k for mine in labels.values() for k in mine})
    counts = np.array([[labels[pid].get(k, 0) for k in keys] for pid in active], float)
    seen = noisy_histograms(counts, settings.label_noise, cfg.seed)
    grouping = (near_iid_groups(seen, settings.groups) if settings.grouping == "near_iid"
                else random_groups(seen, settings.groups, cfg.seed))
    tiers = parse_tiers(settings.tiers)
    tier_of = device_tiers(cfg.clients, [t[2] for t in tiers], cfg.seed)
    state.method.update(
        groups=[[active[i] for i in g] for g in grouping.groups], kl=list(grouping.kl), label_keys=keys,
        tiers=tier_of, speed_estimate=[tiers[t][0] for t in tier_of],
        examples=[declared[pid] for pid in range(cfg.clients)], clock=0.0)


def _devices(cfg, state) -> tuple[np.ndarray, np.ndarray]:
    """Every device's tier speed and link bandwidth (bytes per second)."""
    tiers = parse_tiers(cfg.hierfedlora.tiers)
    tier_of = state.method["tiers"]
    return (np.array([tiers[t][0] for t in tier_of]), np.array([tiers[t][1] for t in tier_of]))


def _step_seconds(server: Layered, depths) -> list[float]:
    return [server.notes["costs"][str(d)]["step_seconds"] for d in depths]


def schedule(server: Layered, cfg, state) -> tuple[list[int], list[list[int]]]:
    """This round's ``tau_m`` and each member's depth, from the estimated device speeds."""
    settings, groups = cfg.hierfedlora, state.method["groups"]
    depths = candidate_depths(cfg, server.num_layers)
    speed = np.array(state.method["speed_estimate"])
    if settings.depth == "device":
        fastest = speed.max()
        return ([int(settings.tau)] * len(groups),
                [[device_depth(speed[i], fastest, depths) for i in g] for g in groups])
    _, bandwidth = _devices(cfg, state)
    times = round_times(_step_seconds(server, depths), speed, bandwidth, groups, depths,
                        cfg.local_steps, server.notes["layer_bytes"])
    sizes = [sum(state.method["examples"][i] for i in g) for g in groups]
    fixed = settings.tau != "auto"
    caps = ([int(settings.tau)] * len(groups) if fixed
            else tau_caps(state.method["kl"], settings.tau_max, settings.kl_ref))
    found = solve(times, sizes, caps, depths, server.num_layers, settings.gamma, fixed_tau=fixed)
    return list(found.tau), [[d] * len(g) for d, g in zip(found.depth, groups, strict=True)]


def plan_groups(server: Layered, cfg, state) -> list[GroupPlan]:
    """Each group's members, ``tau_m`` and assignments (the top ``d`` layers trainable)."""
    tau, depths = schedule(server, cfg, state)
    every = tuple(range(server.num_layers))
    files = layered.files_of(server, every)
    plans = []
    for members, k, mine in zip(state.method["groups"], tau, depths, strict=True):
        assignments = {pid: Assignment(
            layers=every, trainable=every[server.num_layers - d:], kind="layers",
            quantization="bf16", files=files, local_steps=cfg.local_steps,
            batch_size=cfg.batch_size, lr=cfg.lr, mu=cfg.mu) for pid, d in zip(members, mine, strict=True)}
        plans.append(GroupPlan(members=tuple(members), tau=k, assignments=assignments))
    # member_depths, aligned with summary.json's groups, makes depth-only rounds checkable.
    state.method["plan"] = {"tau": tau, "depth": [max(d) for d in depths], "member_depths": depths}
    return plans


def merge(cfg, state, plans: list[GroupPlan], group_states: dict[int, dict], trained) -> None:
    """The global LoRA: layer-wise FedAvg over the groups that trained, weighted by their
    examples (``weights = "size_tau"``: times their intra-group rounds)."""
    if not trained:
        return
    examples = state.method["examples"]
    weights = [sum(examples[i] for i in plans[m].members)
               * (plans[m].tau if cfg.hierfedlora.weights == "size_tau" else 1) for m in trained]
    state.adapter = layerwise_fedavg(state.adapter, [group_states[m] for m in trained], weights)


def round_done(server: Layered, cfg, state, plans: list[GroupPlan]) -> dict:
    """Advance the simulated clock by this global round (the slowest group's ``tau_m``
    intra-group rounds at this round's device speeds) and update the speed estimate."""
    base, bandwidth = _devices(cfg, state)
    speed = round_speeds(base, cfg.hierfedlora.jitter, cfg.seed, state.round)
    costs, steps, per_layer = server.notes["costs"], cfg.local_steps, server.notes["layer_bytes"]
    group_seconds = []
    for plan in plans:
        one = max(steps * costs[str(len(a.trainable))]["step_seconds"] / speed[pid]
                  + 2 * len(a.trainable) * per_layer / bandwidth[pid]
                  for pid, a in plan.assignments.items())
        group_seconds.append(plan.tau * one)
    seconds = max(group_seconds)
    estimate = np.array(state.method["speed_estimate"])
    state.method["speed_estimate"] = (0.5 * estimate + 0.5 * speed).tolist()
    state.method["clock"] += seconds
    return {"simulated_seconds": seconds, "simulated_clock": state.method["clock"],
            "group_seconds": group_seconds, **state.method["plan"]}


def summary(server: Layered, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """The layered figures, the groups and their KL, the tiers, the measured cost per depth
    and the simulated time of the whole run."""
    own = layered.summary(server, cfg, out)
    settings = cfg.hierfedlora
    return {**own, "groups": state.method["groups"], "group_kl": state.method["kl"],
            "device_tiers": state.method["tiers"], "tiers": settings.tiers,
            "grouping": settings.grouping, "tau_setting": settings.tau,
            "depth_setting": settings.depth, "depth_costs": server.notes["costs"],
            "lora_layer_bytes": server.notes["layer_bytes"],
            "simulated_seconds_total": state.method["clock"]}
