"""A global round of a group-based method (HierFedLoRA): groups train apart for their own
number of intra-group rounds, then merge.

The method plans each group (members, assignments, ``tau_m``); each intra-group round sends
every member of a still-active group its group's LoRA (not the global one), screens the
replies against that, and averages each group over its members (on the server, logically
per group: every member's LoRA is counted down and up, as the devices would send it). After
the last intra-group round the method merges the groups into the global LoRA and advances
its simulated clock. The state is checkpointed after every intra-group round, group LoRA
included, so a run stopped inside a global round resumes at the intra-group round it
stopped before, bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fedsoda.federated.checkpoint import ServerState, save_checkpoint
from fedsoda.federated.report import RoundLog
from fedsoda.federated.robust import aggregate
from fedsoda.federated.server_app import Session, deliver_to, train_round
from fedsoda.surgery.lora import layer_of


def _group_lora(adapter: dict[str, torch.Tensor], layers) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter`` on full-model ``layers`` (a group's LoRA)."""
    wanted = set(layers)
    return {k: v.clone() for k, v in adapter.items() if layer_of(k) in wanted}


def _pack(states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"group{m}/{k}": v for m, state in states.items() for k, v in state.items()}


def _unpack(partial: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    states: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in partial.items():
        group, _, name = key.partition("/")
        states.setdefault(int(group.removeprefix("group")), {})[name] = value
    return states


def _resume_point(state: ServerState, plans) -> tuple[RoundLog, int, list[int], dict, float]:
    """Where this global round stands: (log, intra-group rounds done, groups that trained,
    group LoRA, seconds spent), fresh or from a checkpoint taken inside it."""
    log = RoundLog(state.round + 1)
    progress = state.method.get("intra")
    if progress and progress["round"] == state.round + 1:
        log.__dict__.update(progress["log"])  # the counters as they were (plain JSON values)
        states = _unpack(state.partial)
        return log, progress["done"], progress["trained"], states, progress["seconds"]
    states = {m: _group_lora(state.adapter, plan.layers) for m, plan in enumerate(plans)}
    return log, 0, [], states, 0.0


def play_group_round(session: Session, state: ServerState) -> tuple[RoundLog, dict]:
    """One global round: every group's intra-group rounds, the merge, maybe evaluation."""
    cfg, method, server = session.cfg, session.method, session.server
    began = time.perf_counter()
    plans = method.plan_groups(server, cfg, state)
    log, done, trained, states, spent = _resume_point(state, plans)
    everyone = {pid: a for plan in plans for pid, a in plan.assignments.items()}
    served = deliver_to(session, everyone, log)  # a failed delivery: that device sits out
    for step in range(done, max(plan.tau for plan in plans)):
        active = [m for m, plan in enumerate(plans) if plan.tau > step]
        members = {pid: m for m in active for pid in plans[m].assignments if pid in served}
        assignments = {pid: plans[m].assignments[pid] for pid, m in members.items()}
        bases = {pid: states[m] for pid, m in members.items()}
        scopes = {pid: f"group{m}" for pid, m in members.items()}
        accepted = train_round(session, state, assignments, log, bases, step, scopes)
        for m in active:
            mine = [r for r in accepted if r.client in plans[m].assignments]
            if mine:
                states[m] = aggregate(states[m], [r.update for r in mine],
                                      [float(r.num_examples) for r in mine], cfg.robust)
                trained = sorted(set(trained) | {m})
        state.partial = _pack(states)
        state.method["intra"] = {"round": state.round + 1, "done": step + 1, "trained": trained,
                                 "log": dict(log.__dict__),
                                 "seconds": spent + time.perf_counter() - began}
        save_checkpoint(state, Path(cfg.out) / "checkpoint")
    method.merge(cfg, state, plans, states, trained)
    state.method.pop("intra", None)
    state.partial = {}
    state.round += 1
    extra = method.round_done(server, cfg, state, plans)
    realigned = method.after_round(server, cfg, state)
    scored = {}
    if state.round == cfg.rounds or (cfg.eval_every and state.round % cfg.eval_every == 0):
        scored = method.evaluate(server, session.task, session.rows, cfg.data_folder)
    seconds = spent + time.perf_counter() - began  # spent: before a resume, inside this round
    entry = log.finish(scored.get("accuracy"), realigned, seconds, session.submodel_bytes, scored)
    return log, {**entry, **extra}
