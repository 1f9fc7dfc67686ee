"""HierFedLoRA on the runtime: depth-d training, intra-group rounds, heterogeneous-depth
merge, the simulated clock and mid-round resume, on the tiny model in Flower's simulation."""

import dataclasses
import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from fedsoda.data.groups import kl_to
from fedsoda.data.partition import label_counts, task_partitions
from fedsoda.data.tasks import get_task
from fedsoda.federated import hierarchy
from fedsoda.federated.checkpoint import ServerState
from fedsoda.federated.config import RunConfig
from fedsoda.federated.simulation import simulate
from fedsoda.methods.hier_settings import HierFedLoRASettings, parse_tiers
from fedsoda.methods.hierfedlora import GroupPlan, meet_clients, merge, schedule
from fedsoda.schedule import device_depth, device_tiers, round_speeds
from fedsoda.surgery.lora import layer_of
from test_federated_sim import Crash, same_adapter, tiny_config

cloudpickle.register_pickle_by_value(sys.modules[__name__])

# The tiny model: 10 layers, hidden 32, MLP 64, 4 heads of 8, 2 KV heads (KV width 16).
# LoRA r = 8 on q, k, v, o, gate, up, down: A is r x in, B is out x r.
LAYER_LORA = 8 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32) + (32 + 64) + (32 + 64) + (64 + 32))


def write_timings(path, depths=(3, 5, 8, 10)):
    """A cost table by hand: a step at depth d takes 0.1 + 0.01 d s here, peaks at 1 MB."""
    path.write_text(json.dumps({str(d): {"step_seconds": 0.1 + 0.01 * d, "peak_bytes": 10**6}
                                for d in depths}))
    return str(path)


def hier_config(model_dir, data, out, timings, **settings) -> RunConfig:
    hier = HierFedLoRASettings(groups=2, timings=timings, jitter=0.0, **settings)
    return tiny_config(model_dir, data, out, method="hierfedlora", clients=4, clients_per_round=4,
                       rounds=2, eval_every=0, partition="dirichlet:0.5", hierfedlora=hier)


def rounds_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_depth_d_groups_send_d_layers_and_merge_by_group(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "run"
    cfg = hier_config(tiny_model_dir, shared_data, out, write_timings(tmp_path / "t.json"),
                      tau="2", depth="3")
    summary = simulate(cfg)
    rounds = rounds_of(out)
    # Two intra-group rounds of all 4 devices, each sending 3 layers' LoRA up and down.
    assert [r["tau"] for r in rounds] == [[2, 2], [2, 2]] and rounds[0]["depth"] == [3, 3]
    assert rounds[0]["member_depths"] == [[3] * len(g) for g in summary["groups"]]
    assert rounds[0]["params_up"] == rounds[0]["params_down"] == 2 * 4 * 3 * LAYER_LORA
    final = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    trained = {layer_of(k) for k in final if "lora_B" in k and final[k].abs().sum() > 0}
    assert trained == {7, 8, 9}  # LoRA B below the top 3 layers stayed zero: no gradient there
    # The groups came from the declared label histograms (the partition the clients hold).
    rows, parts = task_partitions("sst2", 4, "dirichlet:0.5", 0, str(shared_data))
    keys = [get_task("sst2").partition_key(r) for r in rows]
    hist = np.array([[c["labels"][k] for k in sorted(c["labels"])] for c in label_counts(keys, parts)])
    assert sorted(i for g in summary["groups"] for i in g) == [0, 1, 2, 3]
    for group, kl in zip(summary["groups"], summary["group_kl"], strict=True):
        assert kl == pytest.approx(kl_to(hist[group].sum(0), hist.sum(0)))
    # The clock by hand: at depth 3 a step is 0.13 s here, 2 local steps, 3 layers of LoRA
    # (fp32) down and up; each group's slowest device, two intra-group rounds, slowest group.
    tiers = parse_tiers(cfg.hierfedlora.tiers)
    speed = [tiers[t][0] for t in summary["device_tiers"]]
    link = [tiers[t][1] for t in summary["device_tiers"]]
    one = [max(2 * 0.13 / speed[i] + 2 * 3 * 4 * LAYER_LORA / link[i] for i in g)
           for g in summary["groups"]]
    assert rounds[0]["simulated_seconds"] == pytest.approx(2 * max(one))
    assert summary["simulated_seconds_total"] == pytest.approx(4 * max(one))


def test_merge_of_heterogeneous_depths_by_hand():
    # Three layers, one tensor each; group 0 (3 examples) trained layer 2, group 1 (1 example)
    # layers 1 and 2; nobody layer 0.
    name = "model.layers.{}.self_attn.q_proj.lora_B.weight".format
    state = ServerState(adapter={name(i): torch.full((1,), float(i)) for i in range(3)},
                        method={"examples": [2, 1, 1]})
    plans = [GroupPlan(members=(0,), tau=3, assignments={}),
             GroupPlan(members=(1, 2), tau=1, assignments={})]
    groups = {0: {name(2): torch.tensor([10.0])},
              1: {name(1): torch.tensor([4.0]), name(2): torch.tensor([2.0])}}
    cfg = RunConfig(hierfedlora=HierFedLoRASettings())
    merge(cfg, state, plans, groups, [0, 1])
    # Layer 2: (2 * 10 + 2 * 2) / 4 = 6; layer 1: only group 1 trained it, 4; layer 0 unchanged.
    assert [state.adapter[name(i)].item() for i in range(3)] == [0.0, 4.0, 6.0]
    state.adapter = {name(i): torch.full((1,), float(i)) for i in range(3)}
    merge(dataclasses.replace(cfg, hierfedlora=HierFedLoRASettings(weights="size_tau")),
          state, plans, groups, [0, 1])
    # Weights N_m tau_m: 6 and 2 -> layer 2 (6 * 10 + 2 * 2) / 8 = 8.
    assert state.adapter[name(2)].item() == pytest.approx(8.0)


@pytest.mark.slow  # CI keeps test_federated_sim's resume between rounds
def test_resume_inside_a_global_round_is_bit_for_bit(tiny_model_dir, shared_data, tmp_path,
                                                     monkeypatch):
    timings = write_timings(tmp_path / "t.json")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # Each run's clients start empty, so both count the same one-time download whatever
    # earlier tests left in the shared client storage (the order of tests must not matter).
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache-straight"))
    simulate(hier_config(tiny_model_dir, shared_data, straight, timings, tau="2"))
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache-resumed"))
    original = hierarchy.save_checkpoint

    def crash_inside_round_two(state, folder):
        original(state, folder)
        if state.method.get("intra", {}).get("round") == 2 and state.method["intra"]["done"] == 1:
            raise Crash("killed after the first intra-group round of round 2")

    monkeypatch.setattr(hierarchy, "save_checkpoint", crash_inside_round_two)
    cfg = hier_config(tiny_model_dir, shared_data, resumed, timings, tau="2")
    with pytest.raises(Crash):
        simulate(cfg)
    assert (resumed / "checkpoint" / "partial.safetensors").exists()
    monkeypatch.setattr(hierarchy, "save_checkpoint", original)
    simulate(cfg, resume=True)
    assert same_adapter(straight, resumed)
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rounds_of(straight)] == [drop(r) for r in rounds_of(resumed)]


def test_tiers_speeds_and_device_depths_by_hand():
    # 10 devices, shares 0.2 / 0.5 / 0.3: exactly 2, 5 and 3; 7 devices: 1.4, 3.5, 2.1 ->
    # floors 1, 3, 2 and the one left goes to the largest remainder (0.5: tier 1).
    assert sorted(device_tiers(10, [0.2, 0.5, 0.3], 0)) == [0] * 2 + [1] * 5 + [2] * 3
    assert sorted(device_tiers(7, [0.2, 0.5, 0.3], 0)) == [0] + [1] * 4 + [2] * 2
    assert device_tiers(10, [0.2, 0.5, 0.3], 3) == device_tiers(10, [0.2, 0.5, 0.3], 3)
    assert round_speeds([1.0, 0.5], 0.0, 0, 1).tolist() == [1.0, 0.5]
    many = round_speeds(np.ones(20000), 0.3, 0, 1)
    assert many.mean() == pytest.approx(1.0, abs=0.01)  # mean-one factor
    assert np.log(many).std() == pytest.approx(0.3, abs=0.01)
    # L = 30, grid 8, 15, 23, 30: speed 0.5 needs 15 layers, 0.25 needs 7.5 -> 8, 0.6 -> 18 -> 23.
    assert [device_depth(s, 1.0, (8, 15, 23, 30)) for s in (1.0, 0.5, 0.25, 0.6)] == [30, 15, 8, 23]


def test_depth_only_schedule_gives_each_member_its_own_depth():
    # L = 30, grid 8, 15, 23, 30; estimated speeds 1.0, 0.5, 0.25, 0.6 (fastest 1.0): depths
    # 30, 15, 8 and 23 (0.6 of 30 layers is 18, rounded up the grid), one group, tau 1.
    cfg = RunConfig(method="hierfedlora", clients=4, clients_per_round=4,
                    hierfedlora=HierFedLoRASettings(groups=1, tau="1", depth="device"))
    server = SimpleNamespace(num_layers=30)
    state = SimpleNamespace(method={"groups": [[0, 1, 2, 3]],
                                    "speed_estimate": [1.0, 0.5, 0.25, 0.6]})
    assert schedule(server, cfg, state) == ([1], [[30, 15, 8, 23]])


def test_clients_without_examples_join_no_group():
    # Client 2 holds nothing (Dirichlet 0.1 leaves such clients); the other four split
    # perfectly into two groups of one label-0 and one label-1 client (KL 0 each).
    labels = {0: {0: 10, 1: 0}, 1: {0: 0, 1: 10}, 2: {0: 0, 1: 0}, 3: {0: 10, 1: 0},
              4: {0: 0, 1: 10}}
    declared = {pid: sum(mine.values()) for pid, mine in labels.items()}
    cfg = RunConfig(method="hierfedlora", clients=5, clients_per_round=5,
                    hierfedlora=HierFedLoRASettings(groups=2))
    state = SimpleNamespace(method={})
    meet_clients(None, cfg, state, declared, labels)
    groups = state.method["groups"]
    assert sorted(i for g in groups for i in g) == [0, 1, 3, 4]
    assert all(sorted(labels[i][1] for i in g) == [0, 10] for g in groups)
    assert state.method["kl"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert len(state.method["examples"]) == 5 and state.method["examples"][2] == 0
    too_many = dataclasses.replace(cfg, hierfedlora=HierFedLoRASettings(groups=5))
    with pytest.raises(ValueError, match="only 4 of 5 clients hold examples"):
        meet_clients(None, too_many, SimpleNamespace(method={}), declared, labels)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="clients_per_round = clients"):
        RunConfig(method="hierfedlora", clients=4, clients_per_round=2)
    with pytest.raises(ValueError, match="cannot exceed"):
        RunConfig(method="hierfedlora", clients=2, clients_per_round=2,
                  hierfedlora=HierFedLoRASettings(groups=3))
    with pytest.raises(ValueError, match="SPEED:MBPS:SHARE"):
        HierFedLoRASettings(tiers="fast")
    with pytest.raises(ValueError, match="sum to 1"):
        HierFedLoRASettings(tiers="1:10:0.5")
    with pytest.raises(ValueError, match="set tau to a number"):
        HierFedLoRASettings(depth="device")
    with pytest.raises(ValueError, match="whole number"):
        HierFedLoRASettings(tau="0")
    assert math.isclose(parse_tiers("1:20:1")[0][1], 20e6)
