"""Adapter LoRA moved into the full LLM, and exported as a PEFT folder."""

import copy

import torch
from peft import PeftModel

from conftest import random_batches, tiny_model
from fedsoda.surgery.lora import LoraSpec, attach_lora, load_lora_state, lora_state
from fedsoda.surgery.plan import PruningPlan
from fedsoda.surgery.plugback import export_peft, plug_adapter
from fedsoda.surgery.subllm import build_sub_llm

PLAN = PruningPlan(model="tiny", num_layers=10, adapter_layers=2, n=2, p=2, token="last",
                   samples=1, groups=[[0, 2], [5, 7]])  # kept [0, 3, 4, 5, 8, 9]


def trained_sub_lora(full):
    """A float sub-LLM with random (non-zero) adapter LoRA, standing in for a trained one."""
    sub = attach_lora(build_sub_llm(full, PLAN.kept_layers), PLAN.sub_adapter_layers)
    state = {k: torch.randn_like(v) * 0.05 for k, v in lora_state(sub, PLAN.sub_adapter_layers).items()}
    load_lora_state(sub, state)
    return sub, state


def test_plugged_adapter_lands_on_last_layers():
    full = tiny_model()
    _, state = trained_sub_lora(full)
    plugged = plug_adapter(copy.deepcopy(full), state, PLAN)
    full_state = lora_state(plugged, [8, 9])
    assert set(full_state) == {k.replace("layers.4.", "layers.8.").replace("layers.5.", "layers.9.")
                               for k in state}
    assert torch.equal(full_state["model.layers.9.mlp.up_proj.lora_B.weight"],
                       state["model.layers.5.mlp.up_proj.lora_B.weight"])


def test_sub_and_full_agree_when_pruned_layers_are_skipped():
    """The same LoRA on the same layers computes the same function in both models: with the
    full model's removed layers turned into identities, logits must match the sub-LLM's."""
    full = tiny_model()
    sub, state = trained_sub_lora(full)
    plugged = plug_adapter(copy.deepcopy(full), state, PLAN)
    layers = plugged.get_base_model().model.layers
    handles = [layers[i].register_forward_hook(lambda _m, args, _o: args[0])
               for i in PLAN.removed_layers]
    batch = random_batches(1)[0]
    with torch.no_grad():
        expected, got = sub(**batch).logits, plugged(**batch).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_exported_folder_loads_with_peft_and_gives_same_logits(tmp_path):
    full = tiny_model()
    _, state = trained_sub_lora(full)
    plugged = plug_adapter(copy.deepcopy(full), state, PLAN, LoraSpec())
    export_peft(plugged, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    batch = random_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, plugged(**batch).logits, rtol=0, atol=0)
        assert not torch.allclose(loaded(**batch).logits, full(**batch).logits), "LoRA had no effect"
