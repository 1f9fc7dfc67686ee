"""The planner's figures equal the real accounting on models small enough to build."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_model
from fedsoda.cli import main
from fedsoda.federated.messages import record_params, to_record
from fedsoda.methods import RECIPES
from fedsoda.methods.client_model import layout_plan
from fedsoda.planner import method_figures, plan_methods
from fedsoda.surgery.build import make_sub_llm, save_sub_llm
from fedsoda.surgery.lora import LoraSpec
from fedsoda.surgery.plan import PruneSettings

SETTINGS = PruneSettings(n=2, p=2, adapter_layers=3)


def payload_bytes(folder) -> int:
    """Bytes of the tensors in a folder's safetensors files (without their JSON headers)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", sorted(RECIPES))
def test_planner_matches_a_real_build_of_the_same_model(method, tied, tmp_path):
    torch.manual_seed(0)
    full = tiny_model("qwen2")  # q/k/v biases: they stay bf16 next to NF4 weights
    full.config.tie_word_embeddings = tied
    if not tied:
        full.lm_head.weight = torch.nn.Parameter(full.lm_head.weight.detach().clone())
    recipe = RECIPES[method]
    planned = method_figures(recipe, full.config, SETTINGS, LoraSpec(), realign_every=1,
                             batch=2, seq=16)
    sub = make_sub_llm(full, layout_plan(recipe, "tiny", 10, SETTINGS), tmp_path, seed=0,
                       quantization=recipe.quantization, emulator_lora=recipe.emulator_lora)
    save_sub_llm(sub, tmp_path)
    # What a run counts: parameters of the serialized records (Flower ArrayRecords).
    adapter = record_params(to_record(sub.adapter_lora()))
    emulator = record_params(to_record(sub.emulator_lora())) if sub.emulator_layers else 0
    assert planned["trainable_params"] == adapter
    resent = recipe.realign != "never"  # with r = 1 the emulator LoRA goes out every round
    assert planned["comm_params_per_round"] == 2 * adapter + (emulator if resent else 0)
    stored = payload_bytes(tmp_path / "model") + payload_bytes(tmp_path)
    if recipe.quantization == "nf4":
        # The quant-state JSON of each NF4 weight holds a float whose length varies by a byte or two.
        linears = 7 * len(sub.plan.kept_layers)
        assert abs(planned["client_model_bytes"] - stored) <= 2 * linears
    else:
        assert planned["client_model_bytes"] == stored


def test_shipped_paper_models_have_their_published_sizes():
    llama = plan_methods("llama3-8b")
    assert llama["num_layers"] == 32
    # 8,030,261,248 parameters in bf16 (Meta-Llama-3-8B, untied head).
    assert llama["methods"]["fedpetuning"]["client_model_bytes"] == 2 * 8_030_261_248 + 4 * 20_971_520
    # LoRA r=8 on q, k, v, o (4096x4096, 4096x1024 twice) and gate, up, down (4096x14336):
    per_layer = 8 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert llama["methods"]["fedsoda"]["trainable_params"] == 3 * per_layer
    assert llama["methods"]["fedpetuning"]["trainable_params"] == 32 * per_layer
    # FedBiOT sends every kept emulator layer (32 - 3 - 12 = 17) every round.
    assert llama["methods"]["fedbiot"]["comm_params_per_round"] == 2 * 3 * per_layer + 17 * per_layer
    # FedSODA sends the 4 window starts' LoRA once per 5 rounds.
    assert llama["methods"]["fedsoda"]["comm_params_per_round"] == 6 * per_layer + 4 * per_layer // 5


def test_plan_command_writes_json_and_rejects_unknown_models(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model-config", "mistral-7b", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["methods"]) == {"fedpetuning", "fedot", "fedbiot", "fedsoda"}
    for figures in data["methods"].values():
        assert {"trainable_params", "comm_params_per_round", "client_model_bytes",
                "step_memory_bytes"} <= set(figures)
    assert main(["plan", "--model-config", "gpt-9"]) == 2
    assert "llama3-8b, qwen2-7b, mistral-7b" in capsys.readouterr().err


def test_wire_bytes_per_round_match_a_hand_count_and_the_papers_table_4():
    """LLaMA3-8B, FedSODA, LoRA r=8 on gate, up and down only. Per layer: six tensors, three
    of 8 x 4096 and three of 8 x 14336 values: 442,368 values. A round moves the 3 adapter
    layers both ways and the 4 emulator layers once per 5 rounds: 6.8 layers."""
    from fedsoda.commands.planner import lora_targets

    spec = LoraSpec(targets=lora_targets("mlp"))
    figures = plan_methods("llama3-8b", spec=spec)["methods"]["fedsoda"]
    per_layer = 3 * 8 * 4096 + 3 * 8 * 14336
    assert per_layer == 442_368 and figures["trainable_params"] == 3 * per_layer  # Table 2: 1.3M
    wire = figures["comm_bytes_per_round"]
    # nf4: half a byte a value plus a float32 scale per 64 values (every tensor divides by 64).
    assert wire["nf4"] == int(6.8 * per_layer * (0.5 + 4 / 64))
    assert wire["int8"] == int(6.8 * per_layer * (1 + 4 / 64))
    assert wire["bf16"] == int(6.8 * per_layer * 2)
    assert wire["fp32"] == int(6.8 * (per_layer * 4 + 6 * 128))  # + a .npy header per tensor
    # The paper's 1.43 MB/round is these values at exactly 4 bits, no scales, in MiB.
    assert round(figures["comm_params_per_round"] / 2 / 2**20, 2) == 1.43
    assert wire["nf4"] / 2**20 > 1.43  # the block scales are 12.5% on top at block 64


def test_plan_refuses_unknown_lora_targets(capsys):
    assert main(["plan", "--model-config", "llama3-8b", "--lora-targets", "gate_proj,mlp_fc"]) == 2
    assert "unknown projections ['mlp_fc']" in capsys.readouterr().err


@pytest.mark.parametrize("n, p, realign_every, paper_mb", [
    (3, 4, 5, 1.43), (2, 6, 5, 1.51), (4, 3, 5, 1.39), (3, 4, 2, 1.69), (3, 4, 10, 1.35)])
def test_every_row_of_the_papers_table_4_is_four_bits_a_value_in_mib(n, p, realign_every, paper_mb):
    """The paper's MB/round for LLaMA3-8B (Table 4) is, row by row, our FedSODA parameter
    count with LoRA on gate, up and down at exactly half a byte a value, in MiB (within 0.01:
    the paper rounds (2, 6)'s 1.519 down)."""
    from fedsoda.commands.planner import lora_targets
    from fedsoda.planner import load_model_config

    figures = method_figures(RECIPES["fedsoda"], load_model_config("llama3-8b"),
                             PruneSettings(n=n, p=p, adapter_layers=3),
                             LoraSpec(targets=lora_targets("mlp")), realign_every, batch=8, seq=256)
    assert abs(figures["comm_params_per_round"] / 2 / 2**20 - paper_mb) <= 0.01
