"""The server's dealings with its nodes before and around training: waiting for them, the
handshake (which client each node is, what it holds and declares), and file delivery, each
under the run's deadline (``round_timeout``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsoda.federated.config import RunConfig
from fedsoda.federated.messages import DataSpec, MessageError, blobs_record, record_bytes
from fedsoda.methods.assignment import Assignment


def deadline(cfg: RunConfig) -> float | None:
    """Seconds an exchange with the clients may take (``round_timeout``); None: no deadline."""
    return cfg.round_timeout or None


def data_spec(cfg: RunConfig) -> DataSpec:
    return DataSpec(task=cfg.task, data_dir=cfg.data_dir, clients=cfg.clients,
                    partition=cfg.partition, seed=cfg.seed, max_tokens=cfg.max_tokens,
                    reserve=cfg.align.reserved)


def wait_for_nodes(grid: Grid, count: int, timeout: float = 300.0) -> list[int]:
    began = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"only {len(nodes)} of {count} client nodes connected")
        time.sleep(0.2)
    return nodes


SILENT = "did not answer the handshake by the deadline"


@dataclass
class Clients:
    """What the server knows of its clients: from the handshake, then from deliveries."""

    node_of: dict[int, int] = field(default_factory=dict)  # client (partition) id -> node id
    declared: dict[int, int] = field(default_factory=dict)  # client id -> examples it holds
    held: dict[int, set[str]] = field(default_factory=dict)  # client id -> file hashes held
    labels: dict[int, dict[int, int]] = field(default_factory=dict)  # client id -> label -> examples
    refused: dict[int, str] = field(default_factory=dict)  # node id -> why it was not admitted


def join(grid: Grid, nodes: list[int], cfg: RunConfig, hashes: list[str],
         clients: Clients, live: set[int] | None = None) -> dict[int, str]:
    """Ask each of ``nodes`` which client it is, how many examples it holds (``cfg.max_examples``
    caps what is believed) and which of the run's files it already has; add the sound
    answers to ``clients``. Returns the nodes refused, each with a one-line reason.

    With ``live`` (the nodes connected now), a node claiming a client whose node is gone (a
    SuperNode restarted under a new node id) takes that client over."""
    config = data_spec(cfg).to_record()
    config["hashes"] = sorted(hashes)
    replies = grid.send_and_receive([Message(RecordDict({"config": config}), dst_node_id=n,
                                             message_type="query.hello") for n in nodes],
                                    timeout=deadline(cfg))
    refused, heard = {}, set()
    for reply in replies:
        node = reply.metadata.src_node_id
        heard.add(node)
        if reply.has_error():
            refused[node] = f"client {node} failed the handshake: {reply.error.reason}"
            continue
        try:
            pid, count, labels = read_hello(reply.content, cfg.clients, cfg.max_examples)
        except MessageError as error:
            refused[node] = (f"node {node} answered the handshake with {error}; it must run "
                             "this version of fedsoda")
            continue
        if pid in clients.node_of and (live is None or clients.node_of[pid] in live):
            refused[node] = (f"nodes {clients.node_of[pid]} and {node} both claim partition-id "
                             f"{pid}; every SuperNode needs a distinct partition-id in "
                             f"0..{cfg.clients - 1}")
            continue
        held = reply.content["config"]["held"] if "held" in reply.content["config"] else []
        clients.node_of[pid], clients.declared[pid], clients.labels[pid] = node, count, labels
        clients.held[pid] = set(hashes) & {h for h in held if isinstance(h, str)} \
            if isinstance(held, list) else set()
    for node in sorted(set(nodes) - heard):
        refused[node] = f"node {node} {SILENT}"
    return refused


def admit_late_nodes(grid: Grid, cfg: RunConfig, clients: Clients, hashes: list[str]) -> list[int]:
    """With ``min_nodes``: handshake the nodes that connected since the last look. A node
    refused for what it answered is not asked again (its reason stays in
    ``clients.refused``); one that did not answer in time is asked again next round; one
    that takes over a client whose node is gone (restarted) is admitted. Returns the client
    ids admitted or taken over."""
    live = set(grid.get_node_ids()) if cfg.min_nodes else set()
    new = sorted(live - set(clients.node_of.values()) - set(clients.refused))
    if not new:
        return []
    before = dict(clients.node_of)
    refused = join(grid, new, cfg, hashes, clients, live)
    clients.refused.update({n: why for n, why in refused.items() if SILENT not in why})
    return sorted(pid for pid, node in clients.node_of.items() if before.get(pid) != node)


def handshake(grid: Grid, nodes: list[int], cfg: RunConfig, hashes: list[str]) -> Clients:
    """The clients the run starts with: every client id served (or, with ``min_nodes``, at
    least that many); any refused node stops the run with its reason."""
    clients = Clients()
    refused = join(grid, nodes, cfg, hashes, clients)
    if refused:
        raise RuntimeError(next(iter(refused.values())))
    missing = sorted(set(range(cfg.clients)) - set(clients.node_of))
    if missing and len(clients.node_of) < (cfg.min_nodes or cfg.clients):
        raise RuntimeError(f"no node serves client ids {missing[:5]}; every SuperNode needs a "
                           f"distinct partition-id in 0..{cfg.clients - 1}")
    return clients


def _plain_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_hello(content, clients: int, max_examples: int) -> tuple[int, int, dict[int, int]]:
    """A hello reply's partition id, declared example count (capped at ``max_examples`` when
    set) and label histogram (one count >= 0 per distinct label, summing to the examples);
    a MessageError says what is malformed."""
    metrics, config = (content[k] if k in content else None for k in ("metrics", "config"))
    if not isinstance(metrics, MetricRecord) or not isinstance(config, ConfigRecord):
        raise MessageError("a hello reply without its metrics and config records")
    pid, count = (metrics[k] if k in metrics else None for k in ("partition_id", "num_examples"))
    if not (_plain_int(pid) and 0 <= pid < clients) or not (_plain_int(count) and count >= 0):
        raise MessageError(f"partition-id {pid!r} (0..{clients - 1}) and example count "
                           f"{count!r} must be whole numbers")
    keys = config["label_keys"] if "label_keys" in config else []
    counts = config["label_counts"] if "label_counts" in config else []
    if not (isinstance(keys, list) and isinstance(counts, list)) \
            or not all(_plain_int(v) for v in keys + counts) or len(keys) != len(counts) \
            or len(set(keys)) != len(keys) or any(c < 0 for c in counts) or sum(counts) != count:
        raise MessageError(f"a malformed label histogram (keys {str(keys)[:40]}, counts "
                           f"{str(counts)[:40]} for {count} examples)")
    return pid, min(count, max_examples) if max_examples else count, dict(zip(keys, counts,
                                                                              strict=True))


def deliver(grid: Grid, clients: Clients, assignments: dict[int, Assignment],
            paths: dict[str, Path], timeout: float | None = None) -> tuple[int, dict[int, str]]:
    """Send each client the files of its assignment it lacks; returns the bytes sent and,
    by client, why a delivery failed (such a client sits the round out)."""
    messages, lacking, records = [], {}, {}
    for pid, assignment in sorted(assignments.items()):
        lacking[pid] = {h for _, h in assignment.files} - clients.held[pid]
        if lacking[pid]:
            # Clients lacking the same files share one record: messages wait in the link
            # state until delivered, and 80 copies of a 266 MiB model would not fit.
            key = frozenset(lacking[pid])
            if key not in records:
                records[key] = blobs_record({h: paths[h] for h in key})
            record = records[key]
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
