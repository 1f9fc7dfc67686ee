"""The ServerApp: prepare the models of the run's method, then run round by round
(FedSODA's Algorithm 2; the baselines differ only in their recipe, see ``fedsoda.methods``).

Each round: sample clients, send the sub-LLM to those that lack it (once), send the global
adapter LoRA (and the emulator LoRA to clients whose copy is older than the latest
realignment), screen and FedAvg the replies, realign every ``r`` rounds, evaluate every
``eval_every`` rounds, checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsoda.data.partition import sample_round, task_partitions
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.tasks import evaluation_rows
from fedsoda.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedsoda.federated.client_app import train_config
from fedsoda.federated.config import RunConfig, config_from_flat
from fedsoda.federated.messages import files_record, from_record, record_bytes, to_record
from fedsoda.federated.report import RoundLog, RunProgress, write_summary
from fedsoda.federated.screening import screen_update
from fedsoda.methods import get_recipe, server_models
from fedsoda.surgery.lora import load_lora_state
from fedsoda.training import fedavg

log = logging.getLogger("fedsoda.server")


def client_model_hash(folder: Path) -> str:
    """Content hash of what a client holds: the weights and the LoRA layout and plan.

    The layout counts: two runs can share the same pruned weights (same kept layers) but put
    the adapter LoRA on different layers.
    """
    digest = hashlib.sha256()
    files = [p for p in sorted((folder / "model").iterdir()) if p.is_file()]
    for path in files + [folder / "lora.json", folder / "plan.json"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(cfg: RunConfig) -> str:
    """Names this run's files on the clients (its emulator LoRA, its activation cache).

    Derived from the run folder, so a resumed run finds what its clients already hold.
    """
    return hashlib.sha256(str(Path(cfg.out).resolve()).encode()).hexdigest()[:16]


def wait_for_nodes(grid: Grid, count: int, timeout: float = 300.0) -> list[int]:
    began = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"only {len(nodes)} of {count} client nodes connected")
        time.sleep(0.2)
    return nodes


def handshake(grid: Grid, nodes: list[int], model_hash: str) -> tuple[dict[int, int], set[int]]:
    """Partition id -> node id, and the partitions whose node already holds the sub-LLM."""
    config = ConfigRecord({"model_hash": model_hash})
    replies = grid.send_and_receive([Message(RecordDict({"config": config}), dst_node_id=n,
                                             message_type="query.hello") for n in nodes])
    by_partition, holding = {}, set()
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"client {reply.metadata.src_node_id} failed the handshake: "
                               f"{reply.error.reason}")
        metrics = reply.content["metrics"]
        by_partition[int(metrics["partition_id"])] = reply.metadata.src_node_id
        if metrics["holds_model"]:
            holding.add(int(metrics["partition_id"]))
    return by_partition, holding


def deliver(grid: Grid, nodes: list[int], models: server_models.ServerModels, model_hash: str,
            emulator: dict, run: str) -> int:
    """Send the sub-LLM files (one-time download); returns the bytes sent."""
    if not nodes:
        return 0
    files = files_record(models.folder / "model")
    config = ConfigRecord({"model_hash": model_hash, "run": run,
                           "lora.json": (models.folder / "lora.json").read_text(),
                           "plan.json": (models.folder / "plan.json").read_text()})
    content = RecordDict({"model": files, "emulator": to_record(emulator), "config": config})
    replies = list(grid.send_and_receive([Message(content, dst_node_id=n, message_type="query.deliver")
                                          for n in nodes]))
    failed = [r.metadata.src_node_id for r in replies if r.has_error()]
    if failed or len(replies) != len(nodes):
        raise RuntimeError(f"sub-LLM delivery failed for nodes {failed or 'missing replies'}")
    return len(nodes) * (record_bytes(files) + record_bytes(content["emulator"]))


def train_round(grid: Grid, cfg: RunConfig, state: ServerState, sampled: list[int],
                node_of: dict[int, int], model_hash: str, sizes: dict[int, int],
                round_log: RoundLog) -> list[tuple[dict, float, int]]:
    """Send train messages; return the screened ``(update, weight, partition)`` triples."""
    adapter_record = to_record(state.adapter)
    run = run_key(cfg)
    messages = []
    for pid in sampled:
        content = RecordDict({"adapter": adapter_record, "config": train_config(
            model_hash=model_hash, run=run, round=state.round + 1, task=cfg.task,
            data_dir=cfg.data_dir,            clients=cfg.clients, partition=cfg.partition, seed=cfg.seed,
            max_tokens=cfg.max_tokens, activation_cache=cfg.activation_cache,
            local_steps=cfg.local_steps, batch_size=cfg.batch_size,
            lr=cfg.lr, mu=cfg.mu)})
        round_log.down(adapter_record)
        if state.holders.get(str(pid), -1) < state.emulator_version:
            content["emulator"] = to_record(state.emulator)
            if str(pid) in state.holders:
                round_log.down(content["emulator"])  # an update after a realignment
            else:
                # A client that held the sub-LLM from an earlier run still lacks this run's
                # emulator LoRA: joining, counted with the one-time download, as for a newcomer.
                round_log.join(content["emulator"])
            state.holders[str(pid)] = state.emulator_version
        messages.append(Message(content, dst_node_id=node_of[pid], message_type="train"))
    accepted, errors = [], []
    partition_of = {node: pid for pid, node in node_of.items()}
    for reply in grid.send_and_receive(messages):
        pid = partition_of.get(reply.metadata.src_node_id, -1)
        if reply.has_error():
            errors.append(reply.error.reason)
            round_log.reject(pid, f"client error: {reply.error.reason}")
            continue
        update = from_record(reply.content["adapter"])
        round_log.up(reply.content["adapter"])
        metrics = reply.content["metrics"]
        reason = screen_update(update, state.adapter, metrics.get("num_examples"), sizes[pid])
        if reason:
            round_log.reject(pid, reason)
            continue
        round_log.loss(float(metrics["train_loss"]), float(metrics["num_examples"]))
        accepted.append((update, float(metrics["num_examples"]), pid))
    if errors and len(errors) == len(messages):
        # Every client crashed: a setup problem, not a bad client; going on would only
        # burn the remaining rounds on the unchanged adapter.
        raise RuntimeError(f"round {state.round + 1}: all {len(errors)} clients failed; the "
                           f"first error: {errors[0][-1500:]}")
    return sorted(accepted, key=lambda item: item[2])  # fixed order: bitwise-reproducible sums


def sample_clients(cfg: RunConfig, round_number: int) -> list[int]:
    return sample_round(cfg.seed, cfg.clients, cfg.clients_per_round, round_number)


@dataclass
class Session:
    """What every round of one run needs besides the checkpointed state."""

    grid: Grid
    cfg: RunConfig
    models: server_models.ServerModels
    node_of: dict[int, int]  # partition id -> node id
    holding: set[int]  # partitions whose node holds the client model
    model_hash: str
    sizes: dict[int, int]  # partition id -> number of examples
    task: object
    rows: list[dict]  # evaluation rows
    submodel_bytes: int  # one-time downloads so far


def play_round(session: Session, state: ServerState) -> tuple[RoundLog, dict]:
    """One round: deliver, train, aggregate, maybe realign and evaluate; returns its entry."""
    cfg, models = session.cfg, session.models
    began = time.perf_counter()
    sampled = sample_clients(cfg, state.round + 1)
    newcomers = [p for p in sampled if p not in session.holding]
    session.submodel_bytes += deliver(session.grid, [session.node_of[p] for p in newcomers],
                                      models, session.model_hash, state.emulator,
                                      run_key(cfg))
    session.holding.update(newcomers)
    for pid in newcomers:
        state.holders[str(pid)] = state.emulator_version  # the delivery carried it
    round_log = RoundLog(state.round + 1)
    accepted = train_round(session.grid, cfg, state, sampled, session.node_of, session.model_hash,
                           session.sizes, round_log)
    session.submodel_bytes += round_log.bytes_join
    if accepted:
        state.adapter = fedavg([a[0] for a in accepted], [a[1] for a in accepted])
    server_models.set_global_adapter(models, state.adapter)
    state.round += 1
    every = models.recipe.realign_every(cfg.realign_every)  # FedOT never, FedBiOT every round
    realigned = bool(every) and state.round % every == 0 and state.round < cfg.rounds
    if realigned:
        state.emulator = server_models.realign(models, cfg.align, state.round)["emulator"]
        state.emulator_version += 1
    scored = {}
    if state.round == cfg.rounds or (cfg.eval_every and state.round % cfg.eval_every == 0):
        scored = server_models.evaluate_full(models, session.task, session.rows, cfg.data_folder)
    entry = round_log.finish(scored.get("accuracy"), realigned, time.perf_counter() - began,
                             session.submodel_bytes, scored)
    return round_log, entry


def run_server(grid: Grid, cfg: RunConfig, resume: bool = False) -> dict:
    """The whole run on one grid; writes the run folder and returns the summary."""
    began = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_checkpoint(out / "checkpoint")
    else:
        cfg.save(out / "config.toml")
    models = server_models.prepare(get_recipe(cfg.method), cfg.model, cfg.prune, cfg.align,
                                   cfg.data_folder, out, pre_align=not resume)
    if not resume:
        state = ServerState(adapter=models.sub.adapter_lora(), emulator=models.sub.emulator_lora(),
                            emulator_version=0)
    server_models.set_global_adapter(models, state.adapter)
    load_lora_state(models.sub.model, state.emulator)
    model_hash = client_model_hash(models.folder)
    task = get_task(cfg.task)
    node_of, holding = handshake(grid, wait_for_nodes(grid, cfg.clients), model_hash)
    session = Session(grid=grid, cfg=cfg, models=models, node_of=node_of, holding=holding,
                      model_hash=model_hash, sizes=_partition_sizes(cfg), task=task,
                      rows=evaluation_rows(task, cfg.data_folder, cfg.eval_limit or None),
                      submodel_bytes=state.metrics[-1].get("submodel_bytes_total", 0)
                      if state.metrics else 0)
    sent = sum(m["bytes_down"] + m["bytes_up"] for m in state.metrics)
    with RunProgress(cfg.method, cfg.rounds, state.round, sent) as progress:
        while state.round < cfg.rounds:
            round_log, entry = play_round(session, state)
            state.metrics.append(entry)
            progress.round_done(round_log, entry)
            save_checkpoint(state, out / "checkpoint")
            # Rewritten from the checkpointed state, so a crash at any point never leaves a
            # round twice (or half) in the file after a resume.
            tmp = out / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(m) + "\n" for m in state.metrics))
            tmp.replace(out / "metrics.jsonl")
    return write_summary(cfg, out, models, state, task, session.rows, time.perf_counter() - began)


def _partition_sizes(cfg: RunConfig) -> dict[int, int]:
    _, parts = task_partitions(cfg.task, cfg.clients, cfg.partition, cfg.seed, cfg.data_folder)
    return {pid: len(part) for pid, part in enumerate(parts)}


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's deployment engine (`flwr run`): config from the run config."""
    run_server(grid, config_from_flat(dict(context.run_config)))
