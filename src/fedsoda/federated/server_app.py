"""The ServerApp: prepare the run's method, then run round by round (FedSODA's Algorithm 2;
the other methods differ in what their module assigns and does between rounds, see
``fedsoda.methods``).

Each round: sample clients, ask the method for each one's assignment (layers held, layers
trained, training settings), send each client the files of its assignment it lacks (once,
by content hash), send the global LoRA of its layers (and the emulator LoRA to clients whose
copy is older than the latest realignment), screen every reply against that client's
assignment, average layer-wise, let the method act (realign), evaluate every ``eval_every``
rounds, checkpoint. The server never reads clients' data: the bound on a reply's example
count is what the client declared at the handshake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsoda.data.partition import sample_round
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.tasks import evaluation_rows
from fedsoda.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedsoda.federated.config import RunConfig, config_from_flat, with_method_schedule
from fedsoda.federated.dp import merged_releases, save_releases
from fedsoda.federated.messages import ProbeConfig, TrainConfig, lora_record, to_record, wire_record
from fedsoda.federated.nodes import (
    Clients,
    admit_late_nodes,
    data_spec,
    deadline,
    deliver,
    handshake,
    wait_for_nodes,
)
from fedsoda.federated.report import RoundLog, RunProgress, write_summary
from fedsoda.federated.robust import aggregate, bound_replies
from fedsoda.federated.screening import (
    Reply,
    client_error,
    expected_update,
    screen_probe,
    screen_reply,
)
from fedsoda.federated.tracking import Tracker
from fedsoda.methods import get_method
from fedsoda.methods.assignment import Assignment, ProbeRequest
from fedsoda.wire import Encoded, encode

log = logging.getLogger("fedsoda.server")


class QuorumError(RuntimeError):
    """A round with fewer accepted replies than ``min_replies``: the run stops, the last
    checkpoint intact."""


def run_key(cfg: RunConfig) -> str:
    """Names this run's files on the clients (its emulator LoRA, its activation cache).

    Derived from the run folder, so a resumed run finds what its clients already hold.
    """
    return hashlib.sha256(str(Path(cfg.out).resolve()).encode()).hexdigest()[:16]


@dataclass
class Session:
    """What every round of one run needs besides the checkpointed state."""

    grid: Grid
    cfg: RunConfig
    method: object  # the method's module (``fedsoda.methods.get_method``)
    server: object  # what the method's ``prepare`` returned
    clients: Clients
    paths: dict[str, Path]  # file hash -> where the server holds it
    task: object
    rows: list[dict]  # evaluation rows
    submodel_bytes: int  # one-time downloads so far
    # This round's quantized broadcasts, (round, step, scope) -> what was encoded: the probe
    # and every client of a scope get the same bytes, and the residual advances once.
    sent: dict = field(default_factory=dict)


def broadcast(session: Session, state: ServerState, scope: str, base: dict,
              step: int = 0) -> Encoded:
    """``base`` (the global LoRA, ``scope`` "global", or a group's) encoded for this round's
    downloads, once per round, step and scope. With error feedback down, the residual of the
    scope's last broadcast is added first and the new one kept in the checkpointed state."""
    key = (state.round, step, scope)
    if key not in session.sent:
        wire = session.cfg.wire
        prefix = scope + "/"
        residual = ({k.removeprefix(prefix): v for k, v in state.wire_residual.items()
                     if k.startswith(prefix)} if wire.feedback_down else None)
        encoded = encode(base, wire, residual)
        state.wire_residual.update({prefix + k: v for k, v in encoded.residual.items()})
        session.sent = {k: v for k, v in session.sent.items() if k[0] == state.round}
        session.sent[key] = encoded
    return session.sent[key]


def deliver_to(session: Session, assignments: dict, round_log: RoundLog) -> dict:
    """Deliver the files ``assignments`` need (counted as one-time bytes); returns the
    assignments of the clients that got them, the others logged as rejected for the round."""
    for pid in sorted(set(assignments) - set(session.clients.node_of)):
        round_log.reject(pid, "not connected (yet): it joins when its node connects (min_nodes)")
    assignments = {pid: a for pid, a in assignments.items() if pid in session.clients.node_of}
    sent, failed = deliver(session.grid, session.clients, assignments, session.paths,
                           deadline(session.cfg))
    session.submodel_bytes += sent
    for pid, reason in sorted(failed.items()):
        round_log.reject(pid, reason)
    return {pid: a for pid, a in assignments.items() if pid not in failed}


def exchange(session: Session, messages: list[Message]):
    """Send ``messages``; yield each reply that arrives by the deadline with the client id
    of the node that sent it (-1 for a node that serves no client of this run). An error the
    SuperLink writes for a node ("Node Unavailable" for one whose heartbeat stopped) comes
    from the SuperLink, not the node: it is the client's whose message it answers."""
    client_of = {node: pid for pid, node in session.clients.node_of.items()}
    replies = session.grid.send_and_receive(messages, timeout=deadline(session.cfg))
    sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set on send
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in client_of and reply.has_error():
            node = sent_to.get(reply.metadata.reply_to_message_id, node)
        yield client_of.get(node, -1), reply


def adapter_download(session: Session, state: ServerState, assignment: Assignment | None,
                     scope: str = "global", base: dict | None = None, step: int = 0) -> ArrayRecord:
    """The LoRA a client is sent: its trained layers' tensors of ``base`` (the global LoRA
    unless a group's is given; every tensor for ``assignment=None``), in the run's wire format."""
    base = state.adapter if base is None else base
    wanted = base if assignment is None else expected_update(base, assignment.trainable, assignment)
    if not session.cfg.wire.quantized:
        return to_record(wanted)
    return wire_record(broadcast(session, state, scope, base, step), session.cfg.wire, list(wanted))


def train_message(session: Session, state: ServerState, pid: int, assignment: Assignment,
                  round_log: RoundLog, base: dict | None = None, step: int = 0,
                  scope: str = "global") -> Message:
    """One client's train message: its assignment, its layers' LoRA from ``base`` (the
    global LoRA unless a group's is given), and the emulator LoRA if its copy is stale
    (counted as joining the first time)."""
    cfg = session.cfg
    config = TrainConfig(run=run_key(cfg), round=state.round + 1, assignment=assignment,
                         data=data_spec(cfg), lora=session.server.lora,
                         activation_cache=cfg.activation_cache, step=step, wire=cfg.wire,
                         dp=cfg.dp)
    adapter = adapter_download(session, state, assignment, scope, base, step)
    content = RecordDict({"adapter": adapter, "config": config.to_record()})
    round_log.down(adapter)
    if assignment.frozen_lora and state.holders.get(str(pid), -1) < state.emulator_version:
        content["emulator"] = lora_record(expected_update(state.emulator, assignment.frozen_lora),
                                          cfg.wire)
        if str(pid) in state.holders:
            round_log.down(content["emulator"])  # an update after a realignment
        else:
            # A client's first emulator LoRA of this run: joining, counted with the one-time
            # download whether or not it kept the weights from an earlier run.
            round_log.join(content["emulator"])
        state.holders[str(pid)] = state.emulator_version
    return Message(content, dst_node_id=session.clients.node_of[pid], message_type="train")


def train_round(session: Session, state: ServerState, assignments: dict[int, Assignment],
                round_log: RoundLog, bases: dict[int, dict] | None = None,
                step: int = 0, scopes: dict[int, str] | None = None) -> list[Reply]:
    """Send train messages; return the accepted replies, screened per assignment. ``bases``
    gives a client the LoRA it starts from (its group's, broadcast as ``scopes[pid]``)
    instead of the global one."""
    bases, scopes = bases or {}, scopes or {}
    messages = [train_message(session, state, pid, a, round_log, bases.get(pid), step,
                              scopes.get(pid, "global"))
                for pid, a in sorted(assignments.items())]
    accepted, errors, answered, heard = [], [], set(), set()
    for pid, reply in exchange(session, messages):
        heard.add(pid)
        if reply.has_error():
            errors.append(reply.error.reason)
            round_log.reject(pid, client_error(reply.error.reason))
            continue
        if pid not in assignments or pid in answered:
            round_log.reject(pid, "a reply from a client that was not sampled or already answered")
            continue
        answered.add(pid)
        if "adapter" in reply.content and isinstance(reply.content["adapter"], ArrayRecord):
            round_log.up(reply.content["adapter"])  # what arrived counts, accepted or not
            # Each update a client sent spends privacy, accepted or not (fedsoda.federated.dp).
            state.releases[str(pid)] = state.releases.get(str(pid), 0) + 1
        expected = expected_update(bases.get(pid, state.adapter), assignments[pid].trainable,
                                   assignments[pid])
        result = screen_reply(reply.content, pid, expected, session.clients.declared[pid],
                              session.cfg.wire)
        if isinstance(result, str):
            round_log.reject(pid, result)
            continue
        accepted.append(result)
    if errors and len(errors) == len(messages):
        # Every client crashed: a setup problem, not a bad client; going on would only
        # burn the remaining rounds on the unchanged adapter.
        raise RuntimeError(f"round {state.round + 1}: all {len(errors)} clients failed; the "
                           f"first error: {errors[0][-1500:]}")
    if session.cfg.dp.enabled:  # before anything can stop the round: spent privacy stays spent
        save_releases(Path(session.cfg.out), state.releases)
    for pid in sorted(set(assignments) - heard):  # late replies are dropped
        round_log.reject(pid, f"no reply within round_timeout={session.cfg.round_timeout:g} s")
    sent = {r.client: bases.get(r.client, state.adapter) for r in accepted}
    kept, rejected = bound_replies(sorted(accepted, key=lambda r: r.client), sent,
                                   session.cfg.robust)
    for pid, reason in rejected.items():
        round_log.reject(pid, reason)
    for result in accepted:  # in order of arrival, as the loss was always summed
        if result.client not in rejected:
            round_log.loss(result.loss, float(result.num_examples))
    check_quorum(session.cfg, state, len(kept), len(messages))
    return kept  # in client order: bitwise-reproducible sums


def check_quorum(cfg: RunConfig, state: ServerState, accepted: int, asked: int) -> None:
    """Stop the run, its last checkpoint intact, if a round has fewer accepted replies than
    ``min_replies`` (or than the clients asked, when fewer were)."""
    if accepted < min(cfg.min_replies, asked):
        raise QuorumError(f"round {state.round + 1}: {accepted} of {asked} replies accepted, under "
                          f"min_replies={cfg.min_replies}; nothing of it was kept and the "
                          f"checkpoint after round {state.round} is intact: see the rejected "
                          f"replies in the log, then `fedsoda run --resume {cfg.out}`")


def probe_round(session: Session, state: ServerState, request: ProbeRequest, sampled: list[int],
                round_log: RoundLog) -> list[tuple]:
    """Ask the sampled clients to probe the global model (files they lack go first); returns
    the screened ``(client, similarity, influence, examples)``, in client order."""
    cfg = session.cfg
    sampled = list(deliver_to(session, {pid: request for pid in sampled}, round_log))
    config = ProbeConfig(run=run_key(cfg), round=state.round + 1, files=request.files,
                         num_layers=request.num_layers, data=data_spec(cfg), lora=session.server.lora,
                         samples=request.samples, skip_first=request.skip_first,
                         max_tokens=request.max_tokens, units=request.units, dtype=request.dtype,
                         wire=cfg.wire).to_record()
    adapter = adapter_download(session, state, None)
    messages = []
    for pid in sampled:
        round_log.down(adapter)
        messages.append(Message(RecordDict({"config": config, "adapter": adapter}),
                                dst_node_id=session.clients.node_of[pid], message_type="query.probe"))
    accepted = []
    for pid, reply in exchange(session, messages):
        if reply.has_error():
            round_log.reject(pid, "probe: " + client_error(reply.error.reason))
            continue
        if "probe" in reply.content and isinstance(reply.content["probe"], ArrayRecord):
            round_log.up(reply.content["probe"])
        result = screen_probe(reply.content, pid, request.num_layers, session.clients.declared.get(pid, 0),
                              units=request.units)
        if isinstance(result, str) or pid not in sampled or any(r[0] == pid for r in accepted):
            round_log.reject(pid, f"probe: {result if isinstance(result, str) else 'unexpected reply'}")
            continue
        accepted.append(result)
    return sorted(accepted, key=lambda r: r[0])


def admit_nodes(session: Session) -> None:
    """``min_nodes`` runs: nodes that connected since the last round join now (and
    ``clients.json`` is rewritten); a refused node is logged once and not asked again."""
    clients, refused = session.clients, set(session.clients.refused)
    if admit_late_nodes(session.grid, session.cfg, clients, list(session.paths)):
        write_clients(Path(session.cfg.out), clients)
    for node in sorted(set(clients.refused) - refused):
        log.warning("node %d not admitted: %s", node, clients.refused[node])


def sample_clients(cfg: RunConfig, round_number: int) -> list[int]:
    """The clients of a round (``fedsoda data partition --rounds`` lists the same draw)."""
    return sample_round(cfg.seed, cfg.clients, cfg.clients_per_round, round_number)


def play_round(session: Session, state: ServerState) -> tuple[RoundLog, dict]:
    """One round: assign, deliver, train, aggregate, let the method act, maybe evaluate."""
    cfg, method, server = session.cfg, session.method, session.server
    if hasattr(method, "plan_groups"):  # HierFedLoRA: groups train apart, then merge
        # Deferred: the hierarchy module builds on this one's round functions.
        from fedsoda.federated.hierarchy import play_group_round

        return play_group_round(session, state)
    began = time.perf_counter()
    admit_nodes(session)
    # A sampled client that declared no examples has nothing to train: it is not asked.
    sampled = [pid for pid in sample_clients(cfg, state.round + 1)
               if session.clients.declared.get(pid, 1) > 0]
    round_log = RoundLog(state.round + 1)
    request = method.probe_request(server, cfg, state) if hasattr(method, "probe_request") else None
    if request is not None:  # FedPruner: the clients' view of the global model first
        method.take_probes(server, cfg, state, probe_round(session, state, request, sampled, round_log))
    assignments = method.assign(server, cfg, state, sampled)
    assignments = deliver_to(session, assignments, round_log)
    accepted = train_round(session, state, assignments, round_log)
    session.submodel_bytes += round_log.bytes_join
    if accepted:
        state.adapter = aggregate(state.adapter, [r.update for r in accepted],
                                  [float(r.num_examples) for r in accepted], cfg.robust)
    state.round += 1
    realigned = method.after_round(server, cfg, state)
    scored = {}
    if state.round == cfg.rounds or (cfg.eval_every and state.round % cfg.eval_every == 0):
        scored = method.evaluate(server, session.task, session.rows, cfg.data_folder)
    entry = round_log.finish(scored.get("accuracy"), realigned, time.perf_counter() - began,
                             session.submodel_bytes, scored)
    return round_log, entry


def write_clients(out: Path, clients: Clients) -> None:
    """``clients.json``: what each client declared of its own data at its handshake (the
    server never reads clients' data) and how many of the run's files it already held."""
    (out / "clients.json").write_text(json.dumps(
        {str(pid): {"examples": clients.declared[pid], "files_held": len(clients.held[pid])}
         for pid in sorted(clients.node_of)}, indent=1) + "\n")


def start(grid: Grid, cfg: RunConfig, resume: bool) -> tuple[Session, ServerState]:
    """Prepare the method's server side and the state (fresh or resumed), then handshake."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    method = get_method(cfg.method)
    state = load_checkpoint(out / "checkpoint") if resume else None
    if state is not None:  # updates sent in a round the checkpoint does not hold still count
        state.releases = merged_releases(state.releases, out)
    cfg.save(out / "config.toml")  # a resume may have added rounds
    server = method.prepare(cfg, out, resume)
    if state is None:
        adapter, emulator = method.initial_state(server)
        state = ServerState(adapter=adapter, emulator=emulator, emulator_version=0)
    method.load_state(server, state)
    paths = {digest: path for digest, path in server.files.values()}
    clients = handshake(grid, wait_for_nodes(grid, cfg.min_nodes or cfg.clients), cfg, list(paths))
    empty = sorted(pid for pid, n in clients.declared.items() if n == 0)
    if empty:
        log.warning("clients %s hold no examples under partition %s: they never train",
                    empty, cfg.partition)
    if hasattr(method, "meet_clients"):  # what a method needs of the handshake (label mixes)
        method.meet_clients(server, cfg, state, clients.declared, clients.labels)
    write_clients(out, clients)
    task = get_task(cfg.task)
    session = Session(grid=grid, cfg=cfg, method=method, server=server, clients=clients,
                      paths=paths, task=task,
                      rows=evaluation_rows(task, cfg.data_folder, cfg.eval_limit or None),
                      submodel_bytes=state.metrics[-1].get("submodel_bytes_total", 0)
                      if state.metrics else 0)
    return session, state


def run_server(grid: Grid, cfg: RunConfig, resume: bool = False) -> dict:
    """The whole run on one grid; writes the run folder and returns the summary."""
    began = time.perf_counter()
    cfg = with_method_schedule(cfg)  # idempotent: a RunConfig built by hand gets it too
    out = Path(cfg.out)
    session, state = start(grid, cfg, resume)
    sent = sum(m["bytes_down"] + m["bytes_up"] for m in state.metrics)
    tracker = Tracker(out, cfg.tensorboard, cfg.wandb, dataclasses.asdict(cfg))
    for entry in state.metrics:  # a resume: the rounds before it (a crash may have cut one)
        tracker.round(entry)
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
            tracker.round(entry)
    summary = write_summary(cfg, out, session.method, session.server, state, session.task,
                            session.rows, time.perf_counter() - began)
    tracker.summary(summary, (out / "config.toml").read_text())
    tracker.close()
    return summary


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for Flower's deployment engine (`flwr run`): config from the run config;
    `--run-config 'resume=true out="RUN_DIR"'` continues that run from its checkpoint."""
    values = dict(context.run_config)
    resume = values.pop("resume", False)
    if not isinstance(resume, bool):
        raise ValueError(f"run config 'resume' must be true or false, got {resume!r}")
    run_server(grid, config_from_flat(values), resume=resume)

