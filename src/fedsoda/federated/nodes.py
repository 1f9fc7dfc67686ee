"""The server's dealings with its nodes before and around training: waiting for them, the
handshake (which client each node is, what it holds and declares), and file delivery, each
under the run's deadline (``round_timeout``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsoda.federated.config import RunConfig
from fedsoda.federated.messages import DataSpec, blobs_record, record_bytes
from fedsoda.methods.assignment import Assignment


def deadline(cfg: RunConfig) -> float | None:
    """Seconds an exchange with the clients may take (``round_timeout``); None: no deadline."""
    return cfg.round_timeout or None


def data_spec(cfg: RunConfig) -> DataSpec:
    return DataSpec(task=cfg.task, data_dir=cfg.data_dir, clients=cfg.clients,
                    partition=cfg.partition, seed=cfg.seed, max_tokens=cfg.max_tokens)


def wait_for_nodes(grid: Grid, count: int, timeout: float = 300.0) -> list[int]:
    began = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"only {len(nodes)} of {count} client nodes connected")
        time.sleep(0.2)
    return nodes


@dataclass
class Clients:
    """What the server knows of its clients: from the handshake, then from deliveries."""

    node_of: dict[int, int] = field(default_factory=dict)  # client (partition) id -> node id
    declared: dict[int, int] = field(default_factory=dict)  # client id -> examples it holds
    held: dict[int, set[str]] = field(default_factory=dict)  # client id -> file hashes held
    labels: dict[int, dict[int, int]] = field(default_factory=dict)  # client id -> label -> examples


def handshake(grid: Grid, nodes: list[int], cfg: RunConfig, hashes: list[str]) -> Clients:
    """Ask every node which client it is, how many examples it holds (``cfg.max_examples``
    caps what is believed) and which of the run's files it already has."""
    config = data_spec(cfg).to_record()
    config["hashes"] = sorted(hashes)
    replies = grid.send_and_receive([Message(RecordDict({"config": config}), dst_node_id=n,
                                             message_type="query.hello") for n in nodes],
                                    timeout=deadline(cfg))
    clients = Clients()
    for reply in replies:
        if reply.has_error():
            raise RuntimeError(f"client {reply.metadata.src_node_id} failed the handshake: "
                               f"{reply.error.reason}")
        metrics = reply.content["metrics"]
        pid, count = int(metrics["partition_id"]), int(metrics["num_examples"])
        if pid in clients.node_of:
            raise RuntimeError(f"nodes {clients.node_of[pid]} and {reply.metadata.src_node_id} both "
                               f"claim partition-id {pid}; every SuperNode needs a distinct "
                               f"partition-id in 0..{cfg.clients - 1}")
        clients.node_of[pid] = reply.metadata.src_node_id
        clients.declared[pid] = min(count, cfg.max_examples) if cfg.max_examples else count
        clients.held[pid] = set(hashes) & set(reply.content["config"]["held"])
        clients.labels[pid] = declared_labels(reply.content["config"], count, pid)
    missing = sorted(set(range(cfg.clients)) - set(clients.node_of))
    if missing:
        raise RuntimeError(f"no node serves client ids {missing[:5]}; every SuperNode needs a "
                           f"distinct partition-id in 0..{cfg.clients - 1}")
    return clients


def declared_labels(config, count: int, pid: int) -> dict[int, int]:
    """A hello reply's label histogram, checked: one count >= 0 per distinct label, summing
    to the examples the client declared."""
    keys = list(config["label_keys"]) if "label_keys" in config else []
    counts = list(config["label_counts"]) if "label_counts" in config else []
    plain = all(isinstance(v, int) and not isinstance(v, bool) for v in keys + counts)
    if not plain or len(keys) != len(counts) or len(set(keys)) != len(keys) \
            or any(c < 0 for c in counts) or sum(counts) != count:
        raise RuntimeError(f"client {pid} declared a malformed label histogram (keys {keys[:5]}, "
                           f"counts {counts[:5]} for {count} examples); it must run this "
                           "version of fedsoda")
    return dict(zip(keys, counts, strict=True))


def deliver(grid: Grid, clients: Clients, assignments: dict[int, Assignment],
            paths: dict[str, Path], timeout: float | None = None) -> tuple[int, dict[int, str]]:
    """Send each client the files of its assignment it lacks; returns the bytes sent and,
    by client, why a delivery failed (such a client sits the round out)."""
    messages, lacking = [], {}
    for pid, assignment in sorted(assignments.items()):
        lacking[pid] = {h for _, h in assignment.files} - clients.held[pid]
        if lacking[pid]:
            record = blobs_record({h: paths[h] for h in lacking[pid]})
            messages.append((pid, record, Message(RecordDict({"files": record}),
                                                  dst_node_id=clients.node_of[pid],
                                                  message_type="query.deliver")))
    if not messages:
        return 0, {}
    client_of = {node: pid for pid, node in clients.node_of.items()}
    failed = {pid: "file delivery: no reply by the deadline" for pid, _, _ in messages}
    for reply in grid.send_and_receive([m for _, _, m in messages], timeout=timeout):
        pid = client_of.get(reply.metadata.src_node_id, -1)
        if pid in failed and reply.has_error():
            failed[pid] = f"file delivery failed: {reply.error.reason[-300:]}"
        elif pid in failed:
            del failed[pid]
    for pid, _, _ in messages:
        if pid not in failed:
            clients.held[pid] |= lacking[pid]
    return sum(record_bytes(record) for _, record, _ in messages), failed
