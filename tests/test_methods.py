"""Each method's layer layout on a tiny random model, and its schedule in a run config."""

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from fedsoda.federated.config import load_config
from fedsoda.methods import RECIPES, get_recipe
from fedsoda.methods.server_models import make_plan
from fedsoda.models import load
from fedsoda.surgery.build import make_sub_llm, open_sub_llm
from fedsoda.surgery.lora import layer_of, lora_state
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.plugback import plug_adapter

# 10 layers, L_A = 3, p = 2 windows of n = 2: the tiny counterpart of 30 layers, 3, 4 x 3.
SETTINGS = PruneSettings(n=2, p=2, adapter_layers=3, samples=4, seq_len=16)


def build(method, tmp_path, shared_data=None, model_dir=None):
    full, tokenizer = load(str(model_dir)) if model_dir else (tiny_model(), None)
    recipe = get_recipe(method)
    plan = make_plan(recipe, str(model_dir or "tiny"), full, tokenizer, SETTINGS, shared_data,
                     tmp_path / "plan.json")
    sub = make_sub_llm(full, plan, tmp_path / "sub", seed=0, quantization=recipe.quantization,
                       emulator_lora=recipe.emulator_lora)
    return full, plan, sub


def lora_layers(model) -> list[int]:
    return sorted({layer_of(name) for name in lora_state(model, list(range(99)))})


def stored_dtypes(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {str(handle.get_slice(key).get_dtype()) for key in handle.keys()}


def test_fedpetuning_trains_lora_on_every_layer_of_the_unpruned_16bit_model(tmp_path):
    full, plan, sub = build("fedpetuning", tmp_path)
    assert plan.kept_layers == list(range(10)) and plan.groups == []
    assert sub.adapter_layers == list(range(10)) and sub.emulator_layers == []
    assert lora_layers(sub.model) == list(range(10))
    assert stored_dtypes(tmp_path / "sub" / "model") == {"BF16"}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in sub.model.modules())


def test_fedot_adapter_is_the_first_and_last_two_layers_around_a_uniform_emulator(tmp_path):
    full, plan, sub = build("fedot", tmp_path)
    # Emulator is layers 1..7 (7 layers); two windows of 3 spread evenly: stride 3.5.
    assert plan.full_adapter_layers == [0, 8, 9]
    assert plan.groups == [[1, 3], [5, 7]] and plan.method == "uniform"
    assert plan.kept_layers == [0, 1, 4, 5, 8, 9]
    assert sub.adapter_layers == [0, 4, 5]  # sub-LLM positions of full layers 0, 8, 9
    assert sub.emulator_layers == [1, 2, 3]  # every kept emulator layer carries LoRA
    assert stored_dtypes(tmp_path / "sub" / "model") == {"BF16"}


def test_fedbiot_adapter_is_the_last_three_layers_around_a_uniform_emulator(tmp_path):
    full, plan, sub = build("fedbiot", tmp_path)
    # Emulator is layers 0..6; stride 3.5, windows centred in each half.
    assert plan.full_adapter_layers == [7, 8, 9]
    assert plan.groups == [[0, 2], [4, 6]]
    assert plan.kept_layers == [0, 3, 4, 7, 8, 9]
    assert sub.adapter_layers == [3, 4, 5] and sub.emulator_layers == [0, 1, 2]


def test_fedsoda_sub_llm_is_nf4_with_emulator_lora_on_the_window_starts(tmp_path, shared_data,
                                                                         tiny_model_dir):
    full, plan, sub = build("fedsoda", tmp_path, shared_data, tiny_model_dir)
    assert plan.method == "sgp" and len(plan.groups) == 2
    assert sub.emulator_layers == [s for _, s in plan.index_map]
    assert sub.adapter_layers == [3, 4, 5] and plan.full_adapter_layers == [7, 8, 9]
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in sub.model.modules())


@pytest.mark.parametrize("method", ["fedpetuning", "fedot", "fedbiot"])
def test_adapter_plugs_back_into_the_same_full_layers_and_reopens(method, tmp_path):
    full, plan, sub = build(method, tmp_path)
    adapter = {k: torch.randn_like(v) for k, v in sub.adapter_lora().items()}
    plugged = plug_adapter(full, adapter, plan)
    in_full = lora_state(plugged, plan.full_adapter_layers)
    assert len(in_full) == len(adapter)
    for name, tensor in adapter.items():
        full_index = plan.kept_layers[layer_of(name)]
        renamed = name.replace(f".layers.{layer_of(name)}.", f".layers.{full_index}.")
        assert torch.equal(in_full[renamed], tensor)
    from fedsoda.surgery.build import save_sub_llm

    save_sub_llm(sub, tmp_path / "sub")
    again = open_sub_llm(tmp_path / "sub")
    assert again.quantization == "bf16" and again.emulator_layers == sub.emulator_layers


def test_bf16_client_models_keep_float32_lora_and_train(tmp_path):
    _, _, sub = build("fedot", tmp_path)
    lora = [p for n, p in sub.model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    ids = torch.randint(0, 96, (2, 8))
    for p in lora:
        p.requires_grad_(True)
    sub.model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in lora)


@pytest.mark.parametrize(("method", "realign_every", "marks"), [
    ("fedsoda", 5, {"pruning": True, "pre_align": True, "realign": True}),
    ("fedbiot", 1, {"pruning": True, "pre_align": True, "realign": True}),
    ("fedot", 0, {"pruning": True, "pre_align": True, "realign": False}),
    ("fedpetuning", 0, {"pruning": False, "pre_align": False, "realign": False}),
])
def test_each_method_runs_its_own_realignment_schedule(method, realign_every, marks):
    assert load_config(None, [f"method={method}"]).realign_every == realign_every
    assert RECIPES[method].columns == marks


@pytest.mark.parametrize(("method", "comm"), [
    ("fedsoda", 2 * 100 + 50 / 5),  # emulator LoRA once per 5 rounds
    ("fedbiot", 2 * 100 + 50),  # every round
    ("fedot", 2 * 100),  # never after the one-time download
    ("fedpetuning", 2 * 100),
])
def test_steady_state_comm_is_adapter_both_ways_plus_the_emulator_per_period(method, comm):
    assert RECIPES[method].comm_per_round(adapter=100, emulator=50, realign_every=5) == comm


def test_unknown_method_and_too_few_adapter_layers_for_fedot_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="one of fedpetuning, fedot, fedbiot, fedsoda, fedra, "
                                         "fedlora_exclusive, fedpruner, hierfedlora, got 'fedx'"):
        load_config(None, ["method=fedx"])
    with pytest.raises(ValueError, match="adapter_layers > 1"):
        make_plan(get_recipe("fedot"), "tiny", tiny_model(), None,
                  PruneSettings(n=2, p=2, adapter_layers=1), None, tmp_path / "plan.json")
