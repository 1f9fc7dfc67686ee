"""Client partitions: deterministic under a seed, every example exactly once."""

import json
import random

import pytest

from fedsoda import cli
from fedsoda.data.partition import PartitionScheme, label_counts, partition

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
