"""The two LoRA sets: key layout, separate read/write, NF4 gradients."""

import pytest
import torch

from conftest import random_batches, tiny_model
from fedsoda.models import LORA_TARGETS
from fedsoda.surgery.build import SubLLM, make_sub_llm, open_sub_llm, save_sub_llm
from fedsoda.surgery.lora import layer_of, load_lora_state, read_lora, save_lora, set_trainable
from fedsoda.surgery.plan import PruningPlan

PLAN = PruningPlan(model="tiny", num_layers=10, adapter_layers=2, n=2, p=2, token="last",
                   samples=1, groups=[[0, 2], [5, 7]])  # kept [0, 3, 4, 5, 8, 9]


@pytest.fixture(scope="module")
def sub(tmp_path_factory) -> SubLLM:
    return make_sub_llm(tiny_model("llama"), PLAN, tmp_path_factory.mktemp("sub"))


def expected_keys(layers):
    return {f"model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}.lora_{ab}.weight"
            for i in layers for t in LORA_TARGETS for ab in "AB"}


def test_lora_key_sets(sub):
    assert sub.emulator_layers == [0, 3]  # s_i of the index map [[0, 0], [5, 3]]
    assert sub.adapter_layers == [4, 5]
    assert set(sub.emulator_lora()) == expected_keys([0, 3])
    assert set(sub.adapter_lora()) == expected_keys([4, 5])
    shapes = {k: tuple(v.shape) for k, v in sub.adapter_lora().items()}
    assert shapes["model.layers.4.self_attn.q_proj.lora_A.weight"] == (8, 32)
    assert shapes["model.layers.4.mlp.down_proj.lora_B.weight"] == (32, 8)


def test_linear_layers_are_nf4_with_double_quantization(sub):
    import bitsandbytes as bnb

    proj = sub.model.get_base_model().model.layers[1].self_attn.q_proj
    assert isinstance(proj, bnb.nn.Linear4bit)
    assert proj.weight.quant_state.quant_type == "nf4"
    assert proj.weight.quant_state.nested, "double quantization must be on"


def test_only_requested_set_is_trainable(sub):
    params = set_trainable(sub.model, sub.adapter_layers)
    names = [n for n, p in sub.model.named_parameters() if p.requires_grad]
    assert len(params) == len(expected_keys([4, 5]))
    assert {layer_of(n) for n in names} == {4, 5}
    set_trainable(sub.model, [])


def test_every_trainable_lora_tensor_gets_gradient_after_inference(sub):
    """bitsandbytes on AVX512-BF16 CPUs loses gradients after an eval forward unless the
    repack is disabled; this runs eval inference first, then trains."""
    batch = random_batches(1)[0]
    with torch.no_grad():
        for name, param in sub.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # B = 0 at start would make every A gradient zero
    sub.model.eval()
    with torch.no_grad():
        sub.model(**batch)
    params = set_trainable(sub.model, sub.emulator_layers + sub.adapter_layers)
    sub.model.train()
    sub.model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    set_trainable(sub.model, [])
    sub.model.eval()


def test_sets_saved_and_loaded_separately(sub, tmp_path):
    before_adapter = sub.adapter_lora()
    size = save_lora(before_adapter, tmp_path / "a.safetensors")
    assert size == (tmp_path / "a.safetensors").stat().st_size
    changed = {k: v + 1.0 for k, v in before_adapter.items()}
    emulator_before = sub.emulator_lora()
    load_lora_state(sub.model, changed)
    assert all(torch.equal(sub.adapter_lora()[k], changed[k]) for k in changed)
    assert all(torch.equal(sub.emulator_lora()[k], emulator_before[k]) for k in emulator_before)
    load_lora_state(sub.model, read_lora(tmp_path / "a.safetensors"))
    assert all(torch.equal(sub.adapter_lora()[k], before_adapter[k]) for k in before_adapter)


def test_wrong_key_or_shape_rejected(sub):
    with pytest.raises(KeyError):
        load_lora_state(sub.model, {"model.layers.1.self_attn.q_proj.lora_A.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match="shape"):
        load_lora_state(sub.model, {"model.layers.4.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)})


def test_saved_folder_round_trip(sub, tmp_path_factory):
    folder = sub.model.get_base_model().name_or_path
    sizes = save_sub_llm(sub, folder.rsplit("/model", 1)[0])
    assert sizes["client_model_bytes"] > sizes["model_bytes"] > 0
    reopened = open_sub_llm(folder.rsplit("/model", 1)[0])
    for key, value in sub.adapter_lora().items():
        assert torch.equal(reopened.adapter_lora()[key], value)
    batch = random_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(reopened.model(**batch).logits, sub.model(**batch).logits)
