"""The heterogeneous-client runtime in Flower's simulation engine on a tiny random model:
clients holding different layers (FedRA), layer-wise aggregation checked by hand, malformed
replies rejected while the round goes on, resume and run-to-run reproducibility."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from ray import cloudpickle
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fedsoda.federated import client_app as real
from fedsoda.federated.messages import from_record
from fedsoda.federated.simulation import simulate
from fedsoda.surgery.lora import attach_lora, layer_of, lora_state
from test_federated_sim import clients_with, same_adapter, straight_and_resumed, tiny_config

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Replies are recorded here (a folder the test sets; Ray workers inherit the environment).
RECORD = "FEDSODA_TEST_REPLIES"

def recording_train(message, context):
    reply = real.train(message, context)
    pid = int(context.node_config["partition-id"])
    folder = Path(os.environ[RECORD])
    save_file(from_record(reply.content["adapter"]), str(folder / f"client-{pid}.safetensors"))
    (folder / f"client-{pid}.json").write_text(json.dumps(
        {"num_examples": reply.content["metrics"]["num_examples"]}))
    return reply


recording = clients_with(recording_train)


def test_clients_holding_different_layers_are_averaged_layer_by_layer(
        tiny_model_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD, str(tmp_path))
    out = tmp_path / "fedra"
    cfg = tiny_config(tiny_model_dir, shared_data, out, method="fedra", clients=4,
                      clients_per_round=4, rounds=1, eval_every=0, client_layers="1x1,2x1,2x1,3x1")
    simulate(cfg, clients=recording)
    held = json.loads((out / "checkpoint" / "state.json").read_text())["method"]["layers"]
    assert sorted(len(v) for v in held.values()) == [1, 2, 2, 3]
    replies = {pid: load_file(str(tmp_path / f"client-{pid}.safetensors")) for pid in range(4)}
    counts = {pid: json.loads((tmp_path / f"client-{pid}.json").read_text())["num_examples"]
              for pid in range(4)}
    for pid, update in replies.items():  # named by full-model layer, exactly the ones held
        assert {layer_of(k) for k in update} == set(held[str(pid)])
    final = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    holders = {layer: [p for p in range(4) if layer in held[str(p)]] for layer in range(10)}
    assert any(len(h) >= 2 for h in holders.values()), "no layer shared: averaging untested"
    assert any(not h for h in holders.values()), "every layer held: the untouched case untested"
    torch.manual_seed(0)  # the server's initial LoRA: FedRA seeds it with the run's seed
    initial = lora_state(attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     list(range(10))), list(range(10)))
    for key, value in final.items():
        who = holders[layer_of(key)]
        if not who:  # nobody held this layer: it keeps its global value (B still zero)
            assert torch.equal(value, initial[key]), key
            continue
        # Hand-computed: sum of n_i * u_i over the holders, divided by their sum of n_i.
        total = sum(counts[p] for p in who)
        expected = sum(counts[p] * replies[p][key].double().numpy() for p in who) / total
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-9, err_msg=key)
    assert any(not torch.equal(final[k], initial[k]) for k in final if "lora_B" in k)


@pytest.mark.slow  # CI resumes FedSODA and HierFedLoRA; FedRA's resume runs with FEDSODA_TESTS=all
def test_fedra_resumes_bit_for_bit(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    straight, resumed = straight_and_resumed(
        tiny_model_dir, shared_data, tmp_path, monkeypatch, method="fedra", clients=3,
        clients_per_round=2, rounds=3, eval_every=0, client_layers="3x1,5x1,10x1")
    assert same_adapter(straight, resumed)
    states = [json.loads((run / "checkpoint" / "state.json").read_text()) for run in (straight, resumed)]
    assert states[0]["method"] == states[1]["method"]


@pytest.mark.slow  # CI pins FedSODA's and FedPETuning's runs (test_reproducible) instead
def test_two_identical_runs_give_the_same_adapter_bit_for_bit(tiny_model_dir, shared_data, tmp_path,
                                                             monkeypatch):
    # The activation cache lives in whichever actor served a client before: with 4 clients,
    # 2 a round and 2 actors, each run's cache histories differ, its results must not.
    changes = dict(clients=4, clients_per_round=2, rounds=3, realign_every=0, eval_every=0,
                   local_steps=4)
    for run in ("a", "b"):  # each with empty clients, so the one-time downloads match too
        monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / f"cache-{run}"))
        simulate(tiny_config(tiny_model_dir, shared_data, tmp_path / run, **changes))
    assert same_adapter(tmp_path / "a", tmp_path / "b")
    metrics = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in "ab"]
    assert metrics[0] == metrics[1]


# Six ways a reply can be malformed (client ids 0..5), and one sound client (6).
def malformed_train(message, context):
    reply = real.train(message, context)
    pid, content = int(context.node_config["partition-id"]), reply.content
    if pid == 0:
        del content["metrics"]["train_loss"]
    elif pid == 1:
        del content["metrics"]
    elif pid == 2:
        del content["adapter"]
    elif pid == 3:
        content["adapter"] = ConfigRecord({"not": "arrays"})
    elif pid == 4:
        garbage = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\x00garbage")
        content["adapter"] = ArrayRecord({k: garbage for k in content["adapter"]})
    elif pid == 5:
        content["metrics"]["train_loss"] = float("inf")
    return Message(content, reply_to=message)


malformed = clients_with(malformed_train)


def test_malformed_replies_are_rejected_and_the_run_goes_on(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "malformed"
    cfg = tiny_config(tiny_model_dir, shared_data, out, clients=7, clients_per_round=7, rounds=2,
                      realign_every=0, eval_every=0)
    summary = simulate(cfg, clients=malformed)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        reasons = {r["client"]: r["reason"] for r in entry["rejected"]}
        assert sorted(reasons) == [0, 1, 2, 3, 4, 5], reasons
        for pid, words in enumerate(("'train_loss'", "'metrics'", "'adapter'", "ConfigRecord",
                                     "undecodable", "not a finite")):
            assert words in reasons[pid], reasons[pid]
    assert summary["rejected_replies"] == 12 and summary["accuracy"] is not None
    assert rounds[1]["train_loss"] is not None  # client 6 was averaged in
