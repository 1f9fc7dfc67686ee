"""Deadlines, quorum and node faults on the server, against a stand-in grid: a silent client
is dropped at the deadline, a round under quorum stops the run, a failed delivery excludes
one client, two nodes claiming one partition are refused."""

from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsoda.federated.checkpoint import ServerState
from fedsoda.federated.config import RunConfig
from fedsoda.federated.messages import to_record
from fedsoda.federated.nodes import Clients, admit_late_nodes, deliver, handshake
from fedsoda.federated.report import RoundLog
from fedsoda.federated.server_app import QuorumError, Session, deliver_to, train_round
from fedsoda.methods.assignment import Assignment
from fedsoda.surgery.lora import LoraSpec

KEY = "model.layers.7.self_attn.q_proj.lora_A.weight"
HASH = "ab" * 32


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    # Flower stamps the run id on every message it creates; outside a run there is none.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def reply_to(message: Message, content: RecordDict | Error) -> Message:
    metadata = Metadata(run_id=1, message_id="r", src_node_id=message.metadata.dst_node_id,
                        dst_node_id=0, reply_to_message_id="m", group_id="", created_at=0.0,
                        ttl=3600.0, message_type=message.metadata.message_type)
    return Message(content, metadata=metadata)


class Grid:
    """Answers each message with ``answer(node, message)``: a RecordDict, an Error, or None
    for a node that stays silent past the deadline."""

    def __init__(self, answer):
        self.answer, self.timeouts = answer, []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = [(m, self.answer(m.metadata.dst_node_id, m)) for m in messages]
        return [reply_to(m, content) for m, content in replies if content is not None]


def trained(value: float) -> RecordDict:
    return RecordDict({"adapter": to_record({KEY: torch.full((2, 3), value)}),
                       "metrics": MetricRecord({"num_examples": 10, "train_loss": 0.5})})


def session(grid: Grid, **changes) -> Session:
    clients = Clients(node_of={pid: 100 + pid for pid in range(4)},
                      declared={pid: 10 for pid in range(4)},
                      held={pid: set() for pid in range(4)})
    return Session(grid=grid, cfg=RunConfig(**changes), method=None,
                   server=SimpleNamespace(lora=LoraSpec()), clients=clients,
                   paths={HASH: __file__}, task=None, rows=[], submodel_bytes=0)


def assignments() -> dict[int, Assignment]:
    one = Assignment(layers=(7,), trainable=(7,), files=(("config.json", HASH),), kind="folder",
                     quantization="nf4", local_steps=1, batch_size=1, lr=1e-3, mu=0.0)
    return {pid: one for pid in range(4)}


STATE = ServerState(adapter={KEY: torch.zeros(2, 3)})


def test_clients_lacking_the_same_files_share_one_record_and_each_is_counted(tmp_path):
    """The server holds one copy of a file however many clients it sends it to (80 clients
    x a 266 MiB model would not fit); the bytes on the wire still count every client."""
    sent = []
    grid = Grid(lambda node, m: sent.append(m) or RecordDict())
    clients = session(grid).clients
    clients.held[3] = {HASH}  # client 3 has it already
    other = tmp_path / "other.bin"
    other.write_bytes(b"x" * 100)
    jobs = assignments()
    jobs[2] = Assignment(layers=(7,), trainable=(7,), files=(("other.bin", "cd" * 32),),
                         quantization="nf4", local_steps=1, batch_size=1, lr=1e-3, mu=0.0)
    size = len(open(__file__, "rb").read())
    total, failed = deliver(grid, clients, jobs, {HASH: __file__, "cd" * 32: other})
    assert failed == {} and [m.metadata.dst_node_id for m in sent] == [100, 101, 102]
    records = [m.content["files"] for m in sent]
    assert records[0] is records[1] and records[2] is not records[0]
    npy = 128  # Flower sends arrays as .npy: a 128-byte header for a short 1-D uint8 array
    assert total == 2 * (size + npy) + (100 + npy)
    assert clients.held[0] == clients.held[1] == {HASH} and clients.held[2] == {"cd" * 32}


def test_a_silent_client_is_dropped_at_the_deadline_and_the_round_goes_on():
    grid = Grid(lambda node, m: None if node == 102 else trained(1.0))
    log = RoundLog(1)
    kept = train_round(session(grid, round_timeout=30.0), STATE, assignments(), log)
    assert [r.client for r in kept] == [0, 1, 3] and grid.timeouts == [30.0]
    assert log.rejected == [{"client": 2, "reason": "no reply within round_timeout=30 s"}]


class DeadNodeGrid:
    """As Flower's grids: sets each message's id on send; node 102 is dead, so the SuperLink
    (node 0) answers its message with Flower's "Node Unavailable" error."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for k, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"sent-{k}"
            if message.metadata.dst_node_id != 102:
                replies.append(reply_to(message, trained(1.0)))
                continue
            metadata = Metadata(run_id=1, message_id="e", src_node_id=0, dst_node_id=0,
                                reply_to_message_id=f"sent-{k}", group_id="", created_at=0.0,
                                ttl=3600.0, message_type="train")
            replies.append(Message(Error(code=5, reason="Error: Node Unavailable"),
                                   metadata=metadata))
        return replies


def test_the_superlinks_error_for_a_dead_node_is_that_clients_rejection_once():
    log = RoundLog(1)
    kept = train_round(session(DeadNodeGrid(), round_timeout=30.0), STATE, assignments(), log)
    assert [r.client for r in kept] == [0, 1, 3]
    assert log.rejected == [{"client": 2, "reason": "client error: Error: Node Unavailable"}]


def test_a_round_under_quorum_stops_the_run_saying_how_to_go_on():
    grid = Grid(lambda node, m: trained(1.0) if node == 100 else trained(float("nan")))
    with pytest.raises(QuorumError) as error:
        train_round(session(grid, min_replies=2, out="runs/x"), STATE, assignments(), RoundLog(1))
    message = str(error.value)
    assert "round 1: 1 of 4 replies accepted, under min_replies=2" in message
    assert "checkpoint after round 0 is intact" in message and "--resume runs/x" in message
    # The default asks for one: a round where one client of four is sound goes on.
    assert len(train_round(session(grid), STATE, assignments(), RoundLog(1))) == 1


def test_a_failed_delivery_excludes_that_client_not_the_run():
    def answer(node, m):
        if node == 101:
            return Error(code=0, reason="disk full")
        return None if node == 103 else RecordDict({"metrics": MetricRecord({"ok": 1})})

    run, log = session(Grid(answer), round_timeout=5.0), RoundLog(1)
    left = deliver_to(run, assignments(), log)
    assert sorted(left) == [0, 2]
    assert {r["client"]: r["reason"] for r in log.rejected} == {
        1: "file delivery failed: disk full", 3: "file delivery: no reply by the deadline"}
    assert run.clients.held[0] == {HASH} and run.clients.held[1] == set()


def test_two_nodes_claiming_one_partition_are_refused():
    def hello(node, m):
        return RecordDict({"metrics": MetricRecord({"partition_id": 0 if node < 3 else 1,
                                                    "num_examples": 4}),
                           "config": ConfigRecord({"held": [], "label_keys": [0],
                                                   "label_counts": [4]})})

    with pytest.raises(RuntimeError, match="nodes 1 and 2 both claim partition-id 0"):
        handshake(Grid(hello), [1, 2, 3], RunConfig(clients=2, clients_per_round=2), [])


def hello_as(partition: dict[int, int]):
    """Hello replies: node -> the partition id it claims, 4 examples of label 0 each."""
    def hello(node, m):
        return RecordDict({"metrics": MetricRecord({"partition_id": partition[node],
                                                    "num_examples": 4}),
                           "config": ConfigRecord({"held": [], "label_keys": [0],
                                                   "label_counts": [4]})})
    return hello


def test_min_nodes_starts_with_some_clients_and_admits_late_ones_at_a_round():
    partition = {100: 0, 101: 1, 102: 2, 103: 1}
    grid = Grid(hello_as(partition))
    cfg = RunConfig(clients=4, clients_per_round=4, min_nodes=2)
    with pytest.raises(RuntimeError, match=r"no node serves client ids \[2, 3\]"):
        handshake(grid, [100, 101], RunConfig(clients=4, clients_per_round=4), [])
    clients = handshake(grid, [100, 101], cfg, [])
    assert clients.node_of == {0: 100, 1: 101}
    grid.get_node_ids = lambda: [100, 101]
    assert admit_late_nodes(grid, cfg, clients, []) == []
    # Node 102 serves client 2; node 103 claims client 1, which node 101 serves: refused once.
    grid.get_node_ids = lambda: [100, 101, 102, 103]
    assert admit_late_nodes(grid, cfg, clients, []) == [2]
    assert clients.node_of == {0: 100, 1: 101, 2: 102} and clients.declared[2] == 4
    assert "nodes 101 and 103 both claim partition-id 1" in clients.refused[103]
    asked = len(grid.timeouts)
    assert admit_late_nodes(grid, cfg, clients, []) == [] and len(grid.timeouts) == asked
    # Without min_nodes the run never looks for late nodes.
    assert admit_late_nodes(grid, RunConfig(clients=4, clients_per_round=4), Clients(), []) == []


def test_a_sampled_client_not_connected_yet_sits_the_round_out():
    run, log = session(Grid(lambda node, m: RecordDict({"metrics": MetricRecord({"ok": 1})}))), \
        RoundLog(1)
    del run.clients.node_of[3]
    left = deliver_to(run, assignments(), log)
    assert sorted(left) == [0, 1, 2]
    assert log.rejected == [{"client": 3, "reason": "not connected (yet): it joins when its "
                                                    "node connects (min_nodes)"}]


def test_min_nodes_settings_are_checked_before_anything_starts():
    with pytest.raises(ValueError, match=r"min_nodes must be in 0..clients \(4; 0: all\)"):
        RunConfig(clients=4, clients_per_round=4, min_nodes=5)
    with pytest.raises(ValueError, match="hierfedlora groups every client"):
        RunConfig(method="hierfedlora", clients=4, clients_per_round=4, min_nodes=2)


def test_a_restarted_node_takes_its_client_over_and_a_silent_one_is_asked_again():
    partition = {100: 0, 101: 1, 201: 1, 202: 2}
    answers = {"silent": True}

    def hello(node, m):
        return None if node == 202 and answers["silent"] else hello_as(partition)(node, m)

    grid = Grid(hello)
    cfg = RunConfig(clients=3, clients_per_round=3, min_nodes=2)
    clients = handshake(grid, [100, 101], cfg, [])
    # Node 101 went away; node 201 (its SuperNode restarted) claims client 1; 202 is silent.
    grid.get_node_ids = lambda: [100, 201, 202]
    assert admit_late_nodes(grid, cfg, clients, []) == [1]
    assert clients.node_of == {0: 100, 1: 201} and 202 not in clients.refused
    answers["silent"] = False
    assert admit_late_nodes(grid, cfg, clients, []) == [2] and clients.node_of[2] == 202
