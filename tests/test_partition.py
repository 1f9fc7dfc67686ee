"""Client partitions: deterministic under a seed, every example exactly once."""

import json
import random

import pytest

from fedsoda import cli
from fedsoda.data.partition import (
    PartitionScheme,
    label_counts,
    partition,
    reserved_indices,
    reserved_rows,
    round_label_shares,
    sample_round,
    task_partitions,
)
from fedsoda.data.tasks import get_task
from fedsoda.fidelity import probe_rows

_RNG = random.Random(7)
KEYS = [_RNG.choice([0, 0, 1]) for _ in range(2000)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.1", "dirichlet:0.5", "dirichlet:1.0"])
def test_partition_covers_every_example_once_and_is_seeded(scheme):
    parsed = PartitionScheme.parse(scheme)
    parts = partition(KEYS, 10, parsed, seed=3)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(KEYS)))
    assert parts == partition(KEYS, 10, parsed, seed=3)
    assert parts != partition(KEYS, 10, parsed, seed=4)


def test_smaller_beta_gives_stronger_skew():
    def mean_majority_share(beta):
        counts = label_counts(KEYS, partition(KEYS, 10, PartitionScheme("dirichlet", beta), 0))
        shares = [max(c["labels"].values()) / c["count"] for c in counts if c["count"]]
        return sum(shares) / len(shares)
    assert mean_majority_share(0.1) > mean_majority_share(10.0)


def test_iid_sizes_are_even():
    assert {len(p) for p in partition(KEYS, 8, PartitionScheme("iid"))} == {250}


@pytest.mark.parametrize("text", ["dirichlet", "dirichlet:0", "dirichlet:x", "zipf:1"])
def test_bad_scheme(text):
    with pytest.raises(ValueError, match="iid"):
        PartitionScheme.parse(text)


def test_partition_command_writes_counts_and_plot(shared_data, tmp_path):
    out, plot = tmp_path / "parts.json", tmp_path / "parts.png"
    assert cli.main(["data", "partition", "--task", "gsm8k", "--clients", "5", "--dirichlet",
                     "0.5", "--data-dir", str(shared_data), "--plot", str(plot),
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["task"] == "gsm8k" and len(data["clients"]) == 5
    assert sum(c["count"] for c in data["clients"]) == 7473
    assert set(data["clients"][0]["labels"]) == {"0", "1", "2", "3"}
    assert plot.stat().st_size > 1000


def test_round_label_shares_weight_labels_by_the_sampled_clients_examples():
    counts = [{"id": 0, "count": 10, "labels": {"0": 10, "1": 0}},
              {"id": 1, "count": 30, "labels": {"0": 6, "1": 24}},
              {"id": 2, "count": 20, "labels": {"0": 5, "1": 15}}]
    # clients 1 and 2 hold 50 examples: 11 of label 0, 39 of label 1
    assert round_label_shares(counts, [1, 2]) == pytest.approx({"0": 0.22, "1": 0.78})
    assert round_label_shares(counts, [0]) == {"0": 1.0, "1": 0.0}


def test_sample_round_is_seeded_per_round_and_matches_the_server():
    from fedsoda.federated.config import RunConfig
    from fedsoda.federated.server_app import sample_clients

    cfg = RunConfig(clients=10, clients_per_round=5, seed=3)
    draws = [sample_round(3, 10, 5, t) for t in range(1, 21)]
    assert all(len(set(d)) == 5 and d == sorted(d) and set(d) <= set(range(10)) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert draws == [sample_clients(cfg, t) for t in range(1, 21)]
    assert draws != [sample_round(4, 10, 5, t) for t in range(1, 21)]
    assert sample_round(0, 4, 4, 7) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="clients per round"):
        sample_round(0, 4, 5, 1)


def test_partition_command_lists_each_rounds_label_mix(shared_data, tmp_path):
    out = tmp_path / "parts.json"
    assert cli.main(["data", "partition", "--task", "sst2", "--clients", "10", "--dirichlet",
                     "0.5", "--rounds", "3", "--clients-per-round", "4", "--data-dir",
                     str(shared_data), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3]
    for entry in data["rounds"]:
        assert entry["clients"] == sample_round(0, 10, 4, entry["round"])
        held = [data["clients"][c] for c in entry["clients"]]
        positive = sum(c["labels"]["1"] for c in held) / sum(c["count"] for c in held)
        assert entry["label_shares"]["1"] == pytest.approx(positive)
        assert entry["label_shares"]["0"] == pytest.approx(1 - positive)


def test_partition_command_refuses_more_clients_per_round_than_clients(shared_data, capsys):
    assert cli.main(["data", "partition", "--task", "sst2", "--clients", "4", "--rounds", "2",
                     "--clients-per-round", "5", "--data-dir", str(shared_data)]) != 0
    assert "clients per round must be in 1..4, got 5" in capsys.readouterr().err


def test_reserved_rows_are_the_tail_of_the_probes_permutation():
    # By hand: the permutation random.Random(0) gives 10 items, its last 3 are kept back.
    order = list(range(10))
    random.Random(0).shuffle(order)
    assert reserved_indices(10, 3) == sorted(order[7:]) and reserved_indices(10, 0) == []
    with pytest.raises(ValueError, match="lower align.samples"):
        reserved_indices(10, 10)


def test_kept_back_rows_reach_no_client_and_not_the_probe(shared_data):
    task = get_task("sst2")
    rows, parts = task_partitions("sst2", 10, "dirichlet:0.5", 2, shared_data, reserve=320)
    held = {i for part in parts for i in part}
    reserved = set(reserved_indices(len(rows), 320))
    assert len(held) == sum(map(len, parts)) == len(rows) - 320 and not held & reserved
    # SST-2 repeats some phrases, so rows are compared by position, not by text.
    kept_back = reserved_rows("sst2", 320, shared_data)
    key = lambda row: json.dumps(row, sort_keys=True)  # noqa: E731
    assert sorted(map(key, kept_back)) == sorted(key(rows[i]) for i in reserved)
    assert {r["label"] for r in kept_back[:16]} == {0, 1}  # shuffled, not in file order
    # The probe reads the head of the same permutation: none of its 32 rows is kept back.
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    assert probe_rows(task, shared_data) == [rows[i] for i in order[:32]]
    assert not set(order[:32]) & reserved
    # Nothing kept back: exactly the partition a run without task alignment draws.
    rows0, parts0 = task_partitions("sst2", 10, "dirichlet:0.5", 2, shared_data)
    assert parts0 == partition([task.partition_key(r) for r in rows0], 10,
                               PartitionScheme("dirichlet", 0.5), 2)
