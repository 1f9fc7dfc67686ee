"""Fuzzing every decoder of a message, server side and client side: 10,000 mutated and random
messages. Each decoder must answer with our own rejection (a ``MessageError``, a one-line
reason string) or a sound result, never another exception, and write nothing outside the
folder it was given."""

from __future__ import annotations

import os
import random
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedsoda.federated.messages import (
    MessageError,
    ProbeConfig,
    TrainConfig,
    lora_record,
    read_blobs,
    read_lora_record,
    to_record,
    write_files,
)
from fedsoda.federated.nodes import read_hello
from fedsoda.federated.screening import Reply, screen_probe, screen_reply
from fedsoda.wire_settings import WireSettings
from test_messages import train_config

CASES = 10_000
LAYERS = 4
EXPECTED = {"model.layers.1.mlp.up_proj.lora_A.weight": torch.randn(2, 64),
            "model.layers.1.mlp.up_proj.lora_B.weight": torch.zeros(64, 2)}
WIRES = [WireSettings(), WireSettings(format="nf4"), WireSettings(format="int8", block=32),
         WireSettings(format="bf16")]
NASTY = ["", "..", "../../etc/passwd", "/abs", ".hidden", "a" * 5000, "\x00", "é\u202e", "ab" * 32,
         "0123456789abcdef", "nf4", "fedsoda.nf4.b64", " ", "{}", "-1"]


def nasty_value(rng: random.Random):
    """A config value of a random type, often one a decoder would not expect."""
    return rng.choice([
        rng.randint(-2**63, 2**63 - 1), rng.choice([0, 1, -1, 2**31]), rng.random() * 1e6,
        float("nan"), float("inf"), -0.0, rng.choice([True, False]), rng.choice(NASTY),
        b"\xff\x00" * rng.randint(0, 4), [rng.randint(-5, 50) for _ in range(rng.randint(0, 5))],
        [rng.choice(NASTY) for _ in range(rng.randint(0, 3))], [rng.random()], [True, False]])


def nasty_array(rng: random.Random) -> Array:
    """An array whose dtype, shape, stype and bytes need not agree."""
    shape = rng.choice([[], [0], [3], [64, 2], [2, 64], [2**20, 2**20], [LAYERS, LAYERS], [LAYERS],
                        [rng.randint(0, 9) for _ in range(rng.randint(1, 3))]])
    dtype = rng.choice(["float32", "float64", "int64", "uint8", "nf4", "int8", "bf16", "bool",
                        "<U3", "object", "complex64", "garbage"])
    stype = rng.choice(["numpy.ndarray", "fedsoda.nf4.b64", "fedsoda.int8.b32", "fedsoda.bf16",
                        "", "x"])
    data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 64, 128, 600])))
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def mutate_config(record: ConfigRecord, rng: random.Random) -> ConfigRecord:
    values = dict(record)
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(sorted(values)) if values else "x"
        action = rng.random()
        if action < 0.25:
            values.pop(key, None)
        elif action < 0.85:
            values[key] = nasty_value(rng)
        else:
            values[rng.choice(NASTY + ["run", "round", "extra"])] = nasty_value(rng)
    out = ConfigRecord()
    for key, value in values.items():
        try:
            out[key] = value
        except (TypeError, ValueError):  # Flower itself refuses this value: not a message
            pass
    return out


def mutate_arrays(record: ArrayRecord, rng: random.Random) -> ArrayRecord:
    arrays = OrderedDict(record.items())
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        key = rng.choice(list(arrays)) if arrays else "k"
        if action < 0.2:
            arrays.pop(key, None)
        elif action < 0.7:
            arrays[key] = nasty_array(rng)
        elif action < 0.85:
            data = bytearray(arrays[key].data) if key in arrays else bytearray()
            data = data or bytearray(b"\0")
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            old = arrays.get(key) or nasty_array(rng)
            arrays[key] = Array(dtype=old.dtype, shape=tuple(old.shape), stype=old.stype,
                                data=bytes(data[: rng.choice([len(data), len(data) // 2])]))
        else:
            arrays[rng.choice(NASTY)] = nasty_array(rng)
    return ArrayRecord(arrays)


def mutate_metrics(record: MetricRecord, rng: random.Random) -> MetricRecord:
    values = dict(record)
    key = rng.choice(sorted(values))
    choice = rng.random()
    if choice < 0.3:
        values.pop(key)
    else:
        values[key] = rng.choice([float("nan"), float("inf"), -5, 0, 10**15, 1.5, [1, 2], [0.5],
                                  True])
    out = MetricRecord()
    for k, v in values.items():
        try:
            out[k] = v
        except (TypeError, ValueError):
            pass
    return out


def reply_content(rng: random.Random, wire: WireSettings) -> RecordDict:
    honest = {k: v + 0.01 for k, v in EXPECTED.items()}
    adapter = lora_record(honest, wire) if rng.random() < 0.8 else ArrayRecord()
    metrics = MetricRecord({"num_examples": 10, "train_loss": 0.5})
    content = RecordDict({"adapter": mutate_arrays(adapter, rng) if rng.random() < 0.8 else adapter,
                          "metrics": mutate_metrics(metrics, rng) if rng.random() < 0.5 else metrics})
    if rng.random() < 0.1:  # a record of the wrong kind under a known name
        content[rng.choice(["adapter", "metrics"])] = ConfigRecord({"x": 1})
    return content


def probe_content(rng: random.Random) -> RecordDict:
    sim = torch.eye(LAYERS)
    arrays = to_record({"similarity": sim, "influence": torch.ones(LAYERS)})
    return RecordDict({"probe": mutate_arrays(arrays, rng),
                       "metrics": mutate_metrics(MetricRecord({"num_examples": 5}), rng)})


def hello_reply(rng: random.Random) -> RecordDict:
    metrics = mutate_metrics(MetricRecord({"partition_id": 1, "num_examples": 10}), rng)
    config = mutate_config(ConfigRecord({"held": ["ab" * 32], "label_keys": [0, 1],
                                         "label_counts": [4, 6]}), rng)
    return RecordDict({"metrics": metrics, "config": config})


def check_server(rng: random.Random) -> bool:
    """One server-side decode; whether it accepted the message."""
    which = rng.random()
    if which < 0.5:
        wire = rng.choice(WIRES)
        result = screen_reply(reply_content(rng, wire), 3, EXPECTED, 100, wire)
        assert isinstance(result, (str, Reply))
        if isinstance(result, Reply):
            assert all(torch.isfinite(t).all() for t in result.update.values())
        return isinstance(result, Reply)
    if which < 0.8:
        result = screen_probe(probe_content(rng), 2, LAYERS, 100)
        assert isinstance(result, (str, tuple))
        return isinstance(result, tuple)
    try:
        pid, count, labels = read_hello(hello_reply(rng), clients=4, max_examples=0)
    except MessageError:
        return False
    assert 0 <= pid < 4 and count >= 0 and sum(labels.values()) == count
    return True


def check_client(rng: random.Random, folder: Path) -> bool:
    """One client-side decode; whether it accepted the message."""
    which = rng.random()
    try:
        if which < 0.4:
            TrainConfig.from_record(mutate_config(train_config().to_record(), rng))
        elif which < 0.55:
            record = train_config().to_record()
            for key in ("num_layers", "samples", "max_tokens", "units", "skip_first"):
                record[key] = {"num_layers": 4, "samples": 8, "max_tokens": 64}.get(key, True)
            ProbeConfig.from_record(mutate_config(record, rng))
        elif which < 0.8:
            wire = rng.choice(WIRES)
            read_lora_record(mutate_arrays(lora_record(EXPECTED, wire), rng), wire)
        elif which < 0.9:
            blob = np.frombuffer(b"weights", dtype=np.uint8)
            read_blobs(mutate_arrays(ArrayRecord({"ab" * 32: Array(blob)}), rng))
        else:
            files = ArrayRecord({"config.json": Array(np.frombuffer(b"{}", dtype=np.uint8))})
            write_files(mutate_arrays(files, rng), folder / "model")
    except MessageError:
        return False
    return True


def test_ten_thousand_mutated_messages_meet_only_our_rejections(tmp_path):
    rng = random.Random(2026)
    folder = tmp_path / "storage"
    folder.mkdir()
    before = set(os.listdir(tmp_path))
    accepted = {"server": 0, "client": 0}
    for case in range(CASES):
        side = "server" if case % 2 else "client"
        try:
            accepted[side] += check_server(rng) if side == "server" else check_client(rng, folder)
        except AssertionError:
            raise
        except Exception as error:  # anything but our rejections is a decoder bug
            pytest.fail(f"case {case}: {type(error).__name__}: {str(error)[:300]}")
    # Mutations reach past the first check: some messages pass, most do not.
    assert all(CASES // 50 < n < CASES // 2 for n in accepted.values()), accepted
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert set(os.listdir(tmp_path)) == before  # nothing beside the storage folder
    assert all(folder in p.parents for p in written)
