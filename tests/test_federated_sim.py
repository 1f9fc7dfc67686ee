"""FedSODA end to end in Flower's simulation engine on a tiny random model."""

import dataclasses
import io
import json
import sys

import numpy as np
import pytest
import torch
from flwr.app import Message
from flwr.clientapp import ClientApp
from peft import PeftModel
from ray import cloudpickle
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from fedsoda.align.oda import AlignSettings
from fedsoda.federated import client_app as real
from fedsoda.federated import server_app
from fedsoda.federated.config import RunConfig
from fedsoda.federated.messages import from_record, to_record
from fedsoda.federated.simulation import simulate
from fedsoda.federated.tracking import scalars
from fedsoda.surgery.plan import PruneSettings

# Ray workers cannot import this test module; ship its functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_config(model_dir, data_dir, out, **changes) -> RunConfig:
    base = RunConfig(model=str(model_dir), task="sst2", clients=2, clients_per_round=2,
                     rounds=2, local_steps=2, batch_size=4, lr=1e-3, realign_every=1,
                     eval_every=1, eval_limit=16, max_tokens=48, data_dir=str(data_dir),
                     out=str(out),
                     prune=PruneSettings(n=2, p=2, adapter_layers=2, samples=8, seq_len=32),
                     align=AlignSettings(samples=16, heldout=8, seq_len=32, batch_size=8,
                                         realign_samples=8))
    return dataclasses.replace(base, **changes)


def np_save(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_bytes(tensors) -> int:
    """Bytes of tensors saved as .npy, the format Flower serializes arrays in."""
    return sum(len(np_save(tensor.float().numpy())) for tensor in tensors)


def test_two_rounds_write_a_complete_run_folder(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))  # clients start empty
    out = tmp_path / "run"
    summary = simulate(tiny_config(tiny_model_dir, shared_data, out))
    for name in ("config.toml", "plan.json", "metrics.jsonl", "summary.json", "curve.png",
                 "adapter/adapter_config.json", "align.json", "subllm/model/config.json",
                 "fidelity.png"):
        assert (out / name).exists(), name
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for key in ("train_loss", "accuracy", "bytes_down", "bytes_up", "params_down", "params_up",
                "realigned", "seconds"):
        assert key in rounds[0]
    assert rounds[0]["realigned"] and not rounds[1]["realigned"]  # no realignment after the last
    # The gradient-fidelity probe: before round 1 (B = 0) and at every evaluated round.
    fidelity = json.loads((out / "fidelity.json").read_text())
    assert list(fidelity) == ["0", "1", "2"]
    assert [fidelity[str(r["round"])] for r in rounds] == [r["fidelity"] for r in rounds]
    assert all(-1 <= f["cosine"] <= 1 and f["examples"] == 4 * 8 for f in fidelity.values())
    # TensorBoard's event files hold every number of metrics.jsonl, read back by its reader.
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for entry in rounds:
        for tag, value in scalars({k: v for k, v in entry.items() if k != "round"}).items():
            logged = {e.step: e.value for e in events.Scalars(f"round/{tag}")}
            assert logged[entry["round"]] == pytest.approx(value, rel=1e-6), tag
    assert "round/fidelity/cosine" in events.Tags()["scalars"]
    assert "round/rejected/count" in events.Tags()["scalars"]
    assert events.Scalars("summary/trainable_params")[0].value == summary["trainable_params"]
    # Bytes equal the serialized sizes of the tensors: adapter LoRA down and up for each client;
    # in round 2 the emulator LoRA (new after the realignment) goes down too.
    adapter = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    emulator = load_file(str(out / "checkpoint" / "emulator.safetensors"))
    assert rounds[0]["bytes_up"] == 2 * npy_bytes(adapter.values())
    assert rounds[0]["bytes_down"] == 2 * npy_bytes(adapter.values())
    assert rounds[1]["bytes_down"] == 2 * (npy_bytes(adapter.values()) + npy_bytes(emulator.values()))
    assert rounds[1]["params_up"] == 2 * sum(t.numel() for t in adapter.values())
    assert summary["trainable_params"] == sum(t.numel() for t in adapter.values())
    # The one-time download: every file of the NF4 model folder as raw bytes, plus the
    # pre-aligned emulator LoRA, for each of the two clients.
    files = sorted(p for p in (out / "subllm" / "model").iterdir() if p.is_file())
    emulator_0 = load_file(str(out / "subllm" / "emulator_lora.safetensors"))
    one_client = sum(len(np_save(np.frombuffer(p.read_bytes(), np.uint8))) for p in files)
    assert summary["submodel_download_bytes"] == 2 * (one_client + npy_bytes(emulator_0.values()))
    assert summary["client_download_bytes"] == one_client + npy_bytes(emulator_0.values())
    # The NF4 sub-LLM weights alone are about model.safetensors in size once loaded.
    weights = (out / "subllm" / "model" / "model.safetensors").stat().st_size
    assert summary["client_peak_memory_bytes"] > weights
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(full, out / "adapter")
    assert loaded is not None


@pytest.mark.slow
def test_clients_that_kept_the_sub_llm_cost_the_same_per_round(tiny_model_dir, shared_data,
                                                                tmp_path, monkeypatch):
    # Two runs in one client storage: the second run's clients already hold the sub-LLM.
    # They still need its emulator LoRA; that counts as joining, not as round-1 traffic.
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    first = simulate(tiny_config(tiny_model_dir, shared_data, tmp_path / "a", rounds=1))
    second = simulate(tiny_config(tiny_model_dir, shared_data, tmp_path / "b", rounds=1, seed=1))
    files = sorted(p for p in (tmp_path / "a" / "subllm" / "model").iterdir() if p.is_file())
    one_client = sum(len(np_save(np.frombuffer(p.read_bytes(), np.uint8))) for p in files)
    emulator = npy_bytes(load_file(str(tmp_path / "b" / "subllm" / "emulator_lora.safetensors")).values())
    adapter = npy_bytes(load_file(str(tmp_path / "b" / "checkpoint" / "adapter.safetensors")).values())
    assert first["submodel_download_bytes"] == 2 * (one_client + emulator)
    assert second["submodel_download_bytes"] == 2 * emulator  # the weights were not sent again
    assert first["client_download_bytes"] == second["client_download_bytes"] == one_client + emulator
    rounds = [json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("a", "b")]
    assert rounds[0]["bytes_down"] == rounds[1]["bytes_down"] == 2 * adapter
    assert first["comm_params_per_round"] == second["comm_params_per_round"]


class Crash(RuntimeError):
    pass


def straight_and_resumed(model_dir, data, tmp_path, monkeypatch, **changes):
    """Run folders of one config run straight through, and killed after round 2 then resumed."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    simulate(tiny_config(model_dir, data, straight, **changes))
    cfg = tiny_config(model_dir, data, resumed, **changes)
    original = server_app.save_checkpoint

    def crash_after_round_two(state, folder):
        original(state, folder)
        if state.round == 2:
            raise Crash("killed after round 2")

    monkeypatch.setattr(server_app, "save_checkpoint", crash_after_round_two)
    with pytest.raises(Crash):
        simulate(cfg)
    monkeypatch.setattr(server_app, "save_checkpoint", original)
    simulate(cfg, resume=True)
    return straight, resumed


def same_adapter(*runs) -> bool:
    """Whether the run folders exported bitwise-identical adapters."""
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in runs)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def clients_with(train) -> ClientApp:
    """The real ClientApp's handshake and delivery with another ``train``."""
    clients = ClientApp()
    clients.query("hello")(real.hello)
    clients.query("deliver")(real.deliver)
    clients.train()(train)
    return clients


def test_resume_after_round_two_gives_the_same_adapter(tiny_model_dir, shared_data, tmp_path,
                                                       monkeypatch):
    straight, resumed = straight_and_resumed(tiny_model_dir, shared_data, tmp_path, monkeypatch,
                                             rounds=3, realign_every=2)
    assert same_adapter(straight, resumed)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]


# A client population where three of four clients misbehave.
def misbehaving_train(message, context):
    reply = real.train(message, context)
    pid = int(context.node_config["partition-id"])
    update = from_record(reply.content["adapter"])
    if pid == 0:
        update = {k: torch.full_like(v, float("nan")) for k, v in update.items()}
    elif pid == 1:
        key = sorted(update)[0]
        update[key] = torch.zeros(update[key].shape[0] + 1, update[key].shape[1])
    elif pid == 2:
        reply.content["metrics"]["num_examples"] = 10**9
    reply.content["adapter"] = to_record(update)
    return Message(reply.content, reply_to=message)


bad_clients = clients_with(misbehaving_train)


@pytest.mark.slow  # CI keeps test_heterogeneous_sim's malformed replies and test_fuzz
def test_bad_replies_are_rejected_and_logged(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "bad"
    cfg = tiny_config(tiny_model_dir, shared_data, out, clients=4, clients_per_round=4, rounds=1,
                      realign_every=0)
    summary = simulate(cfg, clients=bad_clients)
    rejected = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["rejected"]
    reasons = {r["client"]: r["reason"] for r in rejected}
    assert "non-finite" in reasons[0] and "shape" in reasons[1] and "outside" in reasons[2]
    assert 3 not in reasons and summary["rejected_replies"] == 3
    assert summary["accuracy"] is not None


def test_a_client_without_examples_is_not_asked_to_train(tiny_model_dir, shared_data, tmp_path):
    # Dirichlet 0.05 over 3 clients, seed 1: client 0 holds none of SST-2's 67,349 rows
    # (37,568 and 29,781 the others); round 1 samples clients 0 and 1.
    out = tmp_path / "empty"
    cfg = tiny_config(tiny_model_dir, shared_data, out, clients=3, clients_per_round=2, seed=1,
                      partition="dirichlet:0.05", realign_every=0, eval_every=0, rounds=1)
    simulate(cfg)
    assert json.loads((out / "clients.json").read_text())["0"]["examples"] == 0
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    assert [r["rejected"] for r in rounds] == [[]]  # not a fault: it was never asked
    assert [r["bytes_up"] for r in rounds] == [npy_bytes(adapter.values())]  # client 1 only


# CI runs FedBiOT, the one that also realigns; all three with FEDSODA_TESTS=all.
@pytest.mark.parametrize("method", [pytest.param("fedpetuning", marks=pytest.mark.slow),
                                    pytest.param("fedot", marks=pytest.mark.slow), "fedbiot"])
def test_baselines_run_on_the_same_runtime_and_send_what_their_recipe_says(
        method, tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / method
    cfg = tiny_config(tiny_model_dir, shared_data, out, method=method, eval_every=0,
                      realign_every={"fedbiot": 1, "fedot": 0, "fedpetuning": 0}[method],
                      prune=PruneSettings(n=2, p=2, adapter_layers=3, samples=8, seq_len=32))
    summary = simulate(cfg)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    emulator = load_file(str(out / "checkpoint" / "emulator.safetensors"))
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in adapter}
    # Named by full-model layer on the wire and in the server's state (10-layer model).
    assert layers == {"fedpetuning": set(range(10)), "fedot": {0, 8, 9},
                      "fedbiot": {7, 8, 9}}[method]
    assert summary["pruning"] is (method != "fedpetuning")
    assert (out / "align.json").exists() is (method != "fedpetuning")
    one_round = 2 * npy_bytes(adapter.values())  # two clients, down
    assert rounds[0]["bytes_up"] == one_round
    assert rounds[0]["bytes_down"] == one_round  # the delivery carried the pre-aligned emulator
    # FedBiOT realigns after round 1 and sends every kept emulator layer's LoRA with round 2.
    extra = 2 * npy_bytes(emulator.values()) if method == "fedbiot" else 0
    assert rounds[1]["bytes_down"] == one_round + extra
    assert [r["realigned"] for r in rounds] == ([True, False] if method == "fedbiot" else [False, False])
    if method == "fedbiot":  # every kept emulator layer, by its full-model index
        kept = json.loads((out / "plan.json").read_text())["kept_layers"]
        assert {int(k.split(".layers.")[1].split(".")[0]) for k in emulator} == set(kept) - {7, 8, 9}
