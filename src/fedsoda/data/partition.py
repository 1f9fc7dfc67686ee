"""Client partitions: IID and Dirichlet label skew, via the Flower Datasets partitioners.

Only ``flwr_datasets`` (a data library) is used here, not the ``flwr`` runtime.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedsoda.data.scheme import PartitionScheme
from fedsoda.data.task import load_rows
from fedsoda.data.tasks import get_task


def partition(keys: list[int], clients: int, scheme: PartitionScheme, seed: int = 0,
              min_size: int = 0) -> list[list[int]]:
    """Row indices per client; every row is in exactly one client. Deterministic in seed.

    With strong skew (beta = 0.1) a client may get no example at all; ``min_size`` asks the
    Dirichlet partitioner to redraw until every client has at least that many (it gives up
    with an error after 10 draws).
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if clients > len(keys):
        raise ValueError(f"{clients} clients but only {len(keys)} examples")
    dataset = Dataset.from_dict({"row": list(range(len(keys))), "label": list(keys)})
    if scheme.kind == "iid":
        partitioner = IidPartitioner(num_partitions=clients)
        dataset = dataset.shuffle(seed=seed)
    else:
        partitioner = DirichletPartitioner(num_partitions=clients, partition_by="label",
                                           alpha=scheme.beta, min_partition_size=min_size,
                                           self_balancing=False, shuffle=True, seed=seed)
    partitioner.dataset = dataset
    return [sorted(partitioner.load_partition(i)["row"]) for i in range(clients)]


def reserved_indices(count: int, reserve: int) -> list[int]:
    """The training rows a server keeps back from the clients to align on (``align.data =
    "task"``): the last ``reserve`` of the fixed permutation whose first rows the
    gradient-fidelity probe reads (``fedsoda.fidelity.probe_rows`` shuffles the rows with
    ``random.Random(0)`` too), so alignment never trains on what the probe measures. The
    same rows for every seed and method, as a server's public set would be."""
    if not 0 <= reserve < count:
        raise ValueError(f"cannot keep back {reserve} of {count} training examples for "
                         "alignment; lower align.samples + align.heldout")
    order = list(range(count))
    random.Random(0).shuffle(order)
    return sorted(order[count - reserve:]) if reserve else []


def task_partitions(task_name: str, clients: int, scheme: str, seed: int,
                    data_dir: str | Path | None,
                    reserve: int = 0) -> tuple[list[dict], list[list[int]]]:
    """A task's train rows and their row indices per client (server and clients agree);
    ``reserve`` rows (``reserved_indices``) go to no client."""
    task = get_task(task_name)
    rows = load_rows(task, task.train_split, data_dir)
    kept = sorted(set(range(len(rows))) - set(reserved_indices(len(rows), reserve)))
    keys = [task.partition_key(rows[i]) for i in kept]
    parts = partition(keys, clients, PartitionScheme.parse(scheme), seed)
    return rows, [[kept[i] for i in part] for part in parts]


def reserved_rows(task_name: str, reserve: int, data_dir: str | Path | None) -> list[dict]:
    """The rows ``task_partitions(..., reserve)`` gives no client, in a fixed shuffled order."""
    task = get_task(task_name)
    rows = load_rows(task, task.train_split, data_dir)
    chosen = reserved_indices(len(rows), reserve)
    random.Random(1).shuffle(chosen)  # both labels in the first batches, not sorted by position
    return [rows[i] for i in chosen]


def label_counts(keys: list[int], parts: list[list[int]]) -> list[dict]:
    """Per-client ``{"id", "count", "labels": {label: n}}`` covering every label."""
    labels = sorted(set(keys))
    result = []
    for client, rows in enumerate(parts):
        counts = Counter(keys[i] for i in rows)
        result.append({"id": client, "count": len(rows),
                       "labels": {str(label): counts.get(label, 0) for label in labels}})
    return result


def sample_round(seed: int, clients: int, per_round: int, round_number: int) -> list[int]:
    """The clients a run with ``seed`` trains in round ``round_number`` (1-based), sorted.

    Seeded per round, so a resumed run samples what an uninterrupted one would.
    """
    if not 1 <= per_round <= clients:
        raise ValueError(f"clients per round must be in 1..{clients}, got {per_round}")
    return sorted(random.Random(seed * 1_000_003 + round_number).sample(range(clients),
                                                                       per_round))


def round_label_shares(counts: list[dict], sampled: list[int]) -> dict[str, float]:
    """Each label's share of the examples held by the ``sampled`` clients (``label_counts`` rows).

    This is the label mix a round's FedAvg sees: replies are weighted by example count.
    """
    held = sum(counts[c]["count"] for c in sampled)
    return {label: sum(counts[c]["labels"][label] for c in sampled) / held if held else 0.0
            for label in counts[0]["labels"]}


def plot_partition(clients: list[dict], title: str, path: Path | str) -> Path:
    """Stacked bars of examples per label for each client (like FedSODA Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(clients[0]["labels"])
    figure, axis = plt.subplots(figsize=(max(4.0, 0.5 * len(clients) + 2), 3.2))
    bottom = [0] * len(clients)
    for label in labels:
        heights = [client["labels"][label] for client in clients]
        axis.bar([c["id"] for c in clients], heights, bottom=bottom, label=f"label {label}")
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axis.set_xlabel("client")
    axis.set_ylabel("examples")
    axis.set_xticks([c["id"] for c in clients])
    axis.set_title(title)
    axis.legend(fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
