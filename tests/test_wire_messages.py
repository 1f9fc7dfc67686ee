"""LoRA in a quantized wire format through the messages, the screening, the client's upload
and the server's broadcast."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsoda.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedsoda.federated.client_app import residual_folder, upload
from fedsoda.federated.config import RunConfig
from fedsoda.federated.messages import MessageError, TrainConfig, read_lora_record, wire_record
from fedsoda.federated.screening import Reply, screen_reply
from fedsoda.federated.server_app import broadcast
from fedsoda.wire import WireSettings, encode
from test_messages import train_config

NF4 = WireSettings("nf4")
KEY = "model.layers.7.self_attn.q_proj.lora_A.weight"
EXPECTED = {KEY: torch.full((2, 64), 0.25)}


def reply(adapter: ArrayRecord) -> RecordDict:
    return RecordDict({"adapter": adapter,
                       "metrics": MetricRecord({"num_examples": 5, "train_loss": 0.5})})


def nf4_array(data: bytes, shape=(2, 64)) -> ArrayRecord:
    return ArrayRecord({KEY: Array(dtype="nf4", shape=shape, stype=NF4.tag, data=data)})


def test_the_wire_settings_travel_in_the_train_config_and_are_checked():
    config = train_config(wire=WireSettings("int8", block=128, error_feedback="up"))
    assert TrainConfig.from_record(config.to_record()) == config
    record = config.to_record()
    record["wire.format"] = "fp8"
    with pytest.raises(MessageError, match="wire.format must be one of"):
        TrainConfig.from_record(record)


def test_a_quantized_reply_is_an_update_added_to_the_lora_the_client_was_sent():
    # 0.5 and -0.5 in one block: absmax 0.5, both on NF4's levels +-1, so exact on the wire.
    delta = torch.tensor([0.5, -0.5] * 64).reshape(2, 64)
    result = screen_reply(reply(wire_record(encode({KEY: delta}, NF4), NF4)), 1, EXPECTED, 5, NF4)
    assert isinstance(result, Reply)
    assert torch.equal(result.update[KEY], EXPECTED[KEY] + delta)
    assert result.update[KEY].dtype == torch.float32


def test_quantized_replies_that_cannot_be_what_the_codec_wrote_are_rejected():
    good = encode({KEY: torch.randn(2, 64)}, NF4).data[KEY]
    nan_scale = good[:-8] + np.array([1.0, np.nan], dtype=np.float32).tobytes()
    huge = good[:-8] + np.array([3e38, 3e38], dtype=np.float32).tobytes()
    int8 = WireSettings("int8")
    cases = [(nf4_array(good[:-1]), "cannot hold 128 values"),
             (nf4_array(nan_scale), "finite"),
             (nf4_array(good, shape=(4, 32)), "shape (4, 32) != (2, 64)"),
             (wire_record(encode({KEY: torch.randn(2, 64)}, int8), int8), "expected 'fedsoda.nf4.b64'"),
             (nf4_array(good, shape=(2, -64)), "not a tensor's")]
    for adapter, reason in cases:
        result = screen_reply(reply(adapter), 1, EXPECTED, 5, NF4)
        assert isinstance(result, str) and reason in result, (reason, result)
    overflow = screen_reply(reply(nf4_array(huge)), 1, {KEY: torch.full((2, 64), 3e38)}, 5, NF4)
    assert overflow == "the update overflows the LoRA it was added to"


def test_the_client_uploads_its_change_with_the_last_uploads_residual_carried_in(tmp_path):
    g = torch.Generator().manual_seed(0)
    start = {KEY: torch.randn(2, 64, generator=g)}
    trained = [{KEY: start[KEY] + 0.01 * torch.randn(2, 64, generator=g)} for _ in range(3)]
    configs = [train_config(round=r, wire=NF4) for r in (1, 2, 3)]
    sent, residual = [], {}
    for config, update in zip(configs, trained, strict=True):
        sent.append(read_lora_record(upload(tmp_path, config, update, start), NF4)[KEY])
        delta = {KEY: update[KEY] - start[KEY]}
        expected = encode(delta, NF4, residual)  # the same stream computed here
        residual = expected.residual
        assert torch.equal(sent[-1], expected.view[KEY])
    folder = residual_folder(tmp_path, configs[0].run)
    assert sorted(p.name for p in folder.iterdir()) == ["000002-000.safetensors",
                                                        "000003-000.safetensors"]
    # The server plays round 3 again after a crash: the same residual goes in, the same bytes out.
    again = read_lora_record(upload(tmp_path, configs[2], trained[2], start), NF4)[KEY]
    assert torch.equal(again, sent[2])
    plain = upload(tmp_path, train_config(round=4, wire=dataclasses.replace(NF4, error_feedback="down")),
                   trained[0], start)
    assert torch.equal(read_lora_record(plain, NF4)[KEY],
                       encode({KEY: trained[0][KEY] - start[KEY]}, NF4).view[KEY])
    with pytest.raises(MessageError, match="sent no LoRA"):
        upload(tmp_path, configs[0], {"model.layers.1.mlp.up_proj.lora_A.weight": torch.ones(1)}, start)


def test_the_server_broadcast_advances_its_residual_once_per_round_step_and_scope(tmp_path):
    session = SimpleNamespace(cfg=RunConfig(wire=NF4), sent={})
    state = ServerState(adapter={KEY: torch.randn(2, 64, generator=torch.Generator().manual_seed(1))})
    first = broadcast(session, state, "global", state.adapter)
    assert broadcast(session, state, "global", state.adapter) is first  # probe and train share it
    residual = state.wire_residual[f"global/{KEY}"]
    assert torch.equal(residual, state.adapter[KEY] - first.view[KEY])
    group = broadcast(session, state, "group1", state.adapter, step=1)
    assert torch.equal(group.view[KEY], first.view[KEY])  # its own stream: no residual yet
    save_checkpoint(state, tmp_path / "checkpoint")
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint").wire_residual[f"global/{KEY}"], residual)
    state.round += 1
    second = broadcast(session, state, "global", state.adapter)
    assert torch.equal(second.view[KEY], encode(state.adapter, NF4, {KEY: residual}).view[KEY])
    assert list(session.sent) == [(1, 0, "global")]  # the last round's broadcasts are let go


@pytest.mark.parametrize("settings", [WireSettings(), NF4])
def test_a_reply_larger_than_its_tensors_can_be_is_rejected_before_decoding(settings, monkeypatch):
    from fedsoda.federated import screening

    def must_not_decode(*_args):
        raise AssertionError("an oversized reply must not be decoded")

    big = ArrayRecord({KEY: Array(dtype="float32", shape=(2, 64), stype="numpy.ndarray",
                                  data=b"\0" * 10_000_000)})
    monkeypatch.setattr(screening, "read_lora_record", must_not_decode)
    result = screen_reply(reply(big), 1, EXPECTED, 5, settings)
    # 2 x 64 values: fp32 128 + 512 bytes, nf4 64 + 8 bytes, each with 64 bytes of slack.
    limit = {"fp32": 128 + 512 + 64, "nf4": 64 + 8 + 64}[settings.format]
    assert result == f"adapter record of 10000000 bytes, over the {limit} its arrays can take; not decoded"


def test_a_probe_reply_larger_than_three_cka_matrices_is_rejected_before_decoding():
    from fedsoda.federated.screening import screen_probe

    big = ArrayRecord({"similarity": Array(dtype="float32", shape=(4, 4), stype="numpy.ndarray",
                                           data=b"\0" * 1_000_000)})
    content = RecordDict({"probe": big, "metrics": MetricRecord({"num_examples": 5})})
    # 4 layers: three 4 x 4 matrices and three 4-vectors, .npy buffers with 64 bytes of slack.
    limit = 3 * (128 + 64 + 64) + 3 * (128 + 16 + 64)
    assert screen_probe(content, 1, 4, 5) == (f"probe record of 1000000 bytes, over the {limit} "
                                              "its arrays can take; not decoded")
