"""A client assigned layers with some blocks dropped (FedPruner+'s unit of pruning) trains and
sends back exactly the LoRA of the blocks it keeps, under full-model names."""

import torch
from flwr.app import Context, Message, Metadata, RecordDict

from fedsoda.federated import client_app
from fedsoda.federated.messages import DataSpec, TrainConfig, blobs_record, from_record, to_record
from fedsoda.federated.screening import expected_update, screen_reply
from fedsoda.methods.assignment import Assignment
from fedsoda.models import load
from fedsoda.models.loading import file_sha256
from fedsoda.surgery.layered import layered_files, save_layered
from fedsoda.surgery.lora import LoraSpec, attach_lora, layer_of, lora_state


def metadata(kind: str) -> Metadata:
    return Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                    group_id="", created_at=0.0, ttl=3600.0, message_type=kind)


def test_a_client_without_some_blocks_sends_only_the_lora_of_the_blocks_it_keeps(
        tiny_model_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    full, tokenizer = load(str(tiny_model_dir))
    save_layered(full, tmp_path / "layered", tokenizer)
    torch.manual_seed(0)
    global_lora = lora_state(attach_lora(full, list(range(10))), list(range(10)))
    layers, blocks = (1, 4, 7), ("attn+mlp", "mlp", "attn")  # 4 loses attention, 7 its MLP
    files = {n: file_sha256(tmp_path / "layered" / n) for n in layered_files(tmp_path / "layered", layers)}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={})
    client_app.deliver(Message(RecordDict({"files": blobs_record(
        {h: tmp_path / "layered" / n for n, h in files.items()})}), metadata=metadata("query.deliver")),
        context)
    assignment = Assignment(layers=layers, trainable=layers, files=tuple(files.items()),
                            kind="layers", blocks=blocks, local_steps=2, batch_size=4, lr=1e-3)
    sent = expected_update(global_lora, layers, assignment)
    # Hand-listed: layer 1 all seven projections, layer 4 the MLP's three, layer 7 attention's four.
    kept = {(layer_of(k), k.split(".")[-3]) for k in sent}
    assert kept == ({(1, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                       "down_proj")} | {(4, p) for p in ("gate_proj", "up_proj", "down_proj")}
                    | {(7, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
    config = TrainConfig(run="0123456789abcdef", round=1, assignment=assignment, lora=LoraSpec(),
                         data=DataSpec(task="sst2", data_dir=str(shared_data), clients=2000,
                                       partition="iid", seed=0, max_tokens=48))
    reply = client_app.train(Message(RecordDict({"config": config.to_record(),
                                                 "adapter": to_record(sent)}),
                                     metadata=metadata("train")), context)
    update = from_record(reply.content["adapter"])
    assert sorted(update) == sorted(sent)
    assert all(not torch.equal(update[k], sent[k]) for k in update if "lora_B" in k)  # all trained
    accepted = screen_reply(reply.content, 0, sent, max_examples=10**6)
    assert not isinstance(accepted, str), accepted
