"""The typed train message, content-addressed files, and screening of malformed replies."""

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fedsoda.federated import client_app
from fedsoda.federated.messages import (
    DataSpec,
    MessageError,
    TrainConfig,
    blobs_record,
    file_hash,
    read_blobs,
    to_record,
)
from fedsoda.federated.screening import Reply, expected_update, screen_reply
from fedsoda.methods.assignment import Assignment, capacities
from fedsoda.surgery.lora import LoraSpec

HASH = "ab" * 32


def train_config(**changes) -> TrainConfig:
    assignment = Assignment(layers=(0, 3, 7), trainable=(7,), frozen_lora=(3,),
                            files=(("config.json", HASH),), kind="folder", quantization="nf4",
                            local_steps=2, batch_size=4, lr=1e-3, mu=0.01)
    base = TrainConfig(run="0123456789abcdef", round=3, assignment=assignment,
                       data=DataSpec(task="sst2", data_dir="/d", clients=4, partition="iid",
                                     seed=1, max_tokens=48), lora=LoraSpec())
    return dataclasses.replace(base, **changes)


def test_train_config_round_trips_through_a_flower_record():
    config = train_config()
    record = config.to_record()
    assert isinstance(record, ConfigRecord)
    back = TrainConfig.from_record(record)
    assert back == config and back.model_hash == config.model_hash
    assert back.assignment.position(7) == 2 and back.assignment.lora_layers == (3, 7)


def test_the_kept_back_rows_travel_only_when_a_server_keeps_some():
    # A run without task alignment sends the record it always sent (same bytes on the wire).
    assert "data.reserve" not in train_config().to_record()
    data = dataclasses.replace(train_config().data, reserve=320)
    config = train_config(data=data)
    assert config.to_record()["data.reserve"] == 320
    assert TrainConfig.from_record(config.to_record()).data.reserve == 320


@pytest.mark.parametrize("key, value, message", [
    ("run", "../../../etc", "run key"),
    ("run", "0123456789ABCDEF", "run key"),
    ("file_names", ["../escape"], "file name"),
    ("file_names", [".hidden"], "file name"),
    ("file_hashes", ["../" + "a" * 61], "file hash"),
    ("layers", "0,3,7", "must be list"),
    ("layers", [0, -1, 7], "layer indices"),
    ("round", "3", "must be int"),
    ("lr", True, "must be float"),
    ("trainable", [5], "must be held"),
])
def test_malformed_train_configs_are_one_line_errors(key, value, message):
    record = train_config().to_record()
    record[key] = value
    with pytest.raises(MessageError, match=message):
        TrainConfig.from_record(record)


def test_a_train_config_without_a_field_names_it():
    record = train_config().to_record()
    del record["local_steps"]
    with pytest.raises(MessageError, match="local_steps"):
        TrainConfig.from_record(record)


def test_blobs_are_checked_against_their_hash(tmp_path):
    (tmp_path / "f").write_bytes(b"weights")
    record = blobs_record({file_hash(b"weights"): tmp_path / "f"})
    assert read_blobs(record) == {file_hash(b"weights"): b"weights"}
    forged = ArrayRecord({HASH: Array(np.frombuffer(b"weights", dtype=np.uint8))})
    with pytest.raises(MessageError, match="does not match its hash"):
        read_blobs(forged)
    with pytest.raises(MessageError, match="file hash"):
        read_blobs(ArrayRecord({"../x": Array(np.frombuffer(b"w", dtype=np.uint8))}))


def test_capacities_parse_and_refuse():
    assert capacities("6x4,12x4,30x2", 10, 30) == [6] * 4 + [12] * 4 + [30] * 2
    assert capacities("", 3, 30) == [30, 30, 30]
    for spec, error in (("6x4", "lists 4 clients"), ("40x10", "1..30"), ("six", "LAYERSxCOUNT")):
        with pytest.raises(ValueError, match=error):
            capacities(spec, 10, 30)


GLOBAL = {"model.layers.7.q_proj.lora_A.weight": torch.zeros(2, 3),
          "model.layers.3.q_proj.lora_A.weight": torch.zeros(2, 3)}
EXPECTED = expected_update(GLOBAL, (7,))


def sound() -> dict:
    return {"adapter": to_record({k: torch.ones(2, 3) for k in EXPECTED}),
            "metrics": MetricRecord({"num_examples": 5, "train_loss": 0.5})}


def garbage_adapter() -> ArrayRecord:
    array = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"garbage")
    return ArrayRecord({k: array for k in EXPECTED})


@pytest.mark.parametrize("change, reason", [
    (lambda c: c["metrics"].pop("train_loss"), "no 'train_loss'"),
    (lambda c: c["metrics"].pop("num_examples"), "no 'num_examples'"),
    (lambda c: c.pop("metrics"), "no 'metrics'"),
    (lambda c: c.pop("adapter"), "no 'adapter'"),
    (lambda c: c.update(adapter=ConfigRecord({"x": 1})), "ConfigRecord, not a ArrayRecord"),
    (lambda c: c.update(adapter=garbage_adapter()), "undecodable"),
    (lambda c: c["metrics"].__setitem__("train_loss", float("nan")), "not a finite number"),
    (lambda c: c["metrics"].__setitem__("num_examples", 6), "outside 1..5"),
    (lambda c: c.update(adapter=to_record({k: torch.ones(2, 3) for k in GLOBAL})), "keys differ"),
])
def test_malformed_replies_are_rejected_with_their_reason(change, reason):
    content = sound()
    change(content)
    result = screen_reply(RecordDict(content), 2, EXPECTED, max_examples=5)
    assert isinstance(result, str) and reason in result, result


def test_a_sound_reply_is_accepted():
    result = screen_reply(RecordDict(sound()), 2, EXPECTED, max_examples=5)
    assert isinstance(result, Reply) and (result.client, result.num_examples) == (2, 5)
    assert sorted(result.update) == sorted(EXPECTED)


def message(content: dict, kind: str) -> Message:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0,
                        message_type=kind)
    return Message(RecordDict(content), metadata=metadata)


def test_crafted_path_parts_never_reach_outside_the_client_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    record = train_config().to_record()
    record["run"] = "../../../../outside"
    with pytest.raises(MessageError, match="run key"):
        client_app.train(message({"config": record, "adapter": to_record({})}, "train"), context)
    crafted = ArrayRecord({"../../outside": Array(np.frombuffer(b"x", dtype=np.uint8))})
    with pytest.raises(MessageError, match="file hash"):
        client_app.deliver(message({"files": crafted}, "query.deliver"), context)
    assert not (tmp_path / "outside").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []  # nothing at all was written


def test_probe_config_round_trips_and_refuses_crafted_names():
    from fedsoda.federated.messages import ProbeConfig

    config = ProbeConfig(run="0123456789abcdef", round=2, files=(("layer-000.safetensors", HASH),),
                         num_layers=30, data=train_config().data, lora=LoraSpec(), samples=8)
    assert ProbeConfig.from_record(config.to_record()) == config
    record = config.to_record()
    record["file_names"] = ["../../x"]
    with pytest.raises(MessageError, match="file name"):
        ProbeConfig.from_record(record)
    record = config.to_record()
    record["samples"] = 0
    with pytest.raises(MessageError, match="must be >= 1"):
        ProbeConfig.from_record(record)
    half = dataclasses.replace(config, dtype="bfloat16")
    assert ProbeConfig.from_record(half.to_record()).dtype == "bfloat16"
    record = config.to_record()
    record["dtype"] = "float16"
    with pytest.raises(MessageError, match="dtype must be one of"):
        ProbeConfig.from_record(record)
