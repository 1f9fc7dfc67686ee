"""Orchestrated distillation alignment on a tiny model."""

import copy
import dataclasses

import pytest
import torch

from conftest import random_batches, tiny_model
from fedsoda.align.oda import (
    AlignSettings,
    Layout,
    align,
    cache_teacher,
    decision_rows,
    measure,
    realign,
    realign_indices,
    teacher_logits,
)
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.plan import PruningPlan
from fedsoda.surgery.plugback import plug_adapter

PLAN = PruningPlan(model="tiny", num_layers=10, adapter_layers=2, n=2, p=2, token="last",
                   samples=1, groups=[[0, 2], [5, 7]])


@pytest.fixture
def setup(tmp_path):
    full = tiny_model("llama")
    sub = make_sub_llm(full, PLAN, tmp_path)
    adapter = {k: torch.randn_like(v) * 0.05 for k, v in sub.adapter_lora().items()}
    from fedsoda.surgery.lora import load_lora_state
    load_lora_state(sub.model, adapter)  # a non-trivial global adapter LoRA
    teacher = plug_adapter(copy.deepcopy(full), adapter, PLAN)
    return full, sub, teacher


def test_layout_by_hand():
    layout = Layout.of(PLAN)  # index map [[0, 0], [5, 3]], n = 2, L_E = 8, sub L_E = 4
    assert layout.pairs == ((2, 0), (7, 3))
    assert layout.final == (7, 3)
    assert layout.full_adapter == (8, 9)


def test_cache_and_teacher_logits_match_a_plain_forward(setup):
    _, _, teacher = setup
    batches = random_batches()
    cache = cache_teacher(teacher, PLAN, batches)
    with torch.no_grad():
        for batch, hidden in zip(batches, cache.hidden, strict=True):
            out = teacher(**batch, output_hidden_states=True)
            for layer in (2, 7):  # hidden_states[l + 1] is the output of layer l
                torch.testing.assert_close(hidden[layer], out.hidden_states[layer + 1])
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(teacher_logits(teacher, PLAN, batch, hidden),
                                       out.logits[real], rtol=1e-5, atol=1e-5)


def test_alignment_trains_only_emulator_lora_and_lowers_kl(setup):
    _, sub, teacher = setup
    cache = cache_teacher(teacher, PLAN, random_batches(4))
    adapter_before, emulator_before = sub.adapter_lora(), sub.emulator_lora()
    before = measure(teacher, sub.model, PLAN, cache)
    settings = AlignSettings(lr=1e-2, alpha=1.0, beta=1.0)  # both terms weighted: both must fall
    result = align(teacher, sub.model, PLAN, cache, settings, epochs=5)
    after = measure(teacher, sub.model, PLAN, cache)
    assert result["steps"] == 20
    assert after["kl"] < 0.7 * before["kl"] and after["rep"] < before["rep"]
    assert all(torch.equal(sub.adapter_lora()[k], v) for k, v in adapter_before.items())
    assert any(not torch.equal(sub.emulator_lora()[k], v) for k, v in emulator_before.items())
    assert not any(p.requires_grad for p in sub.model.parameters()), "left trainable"


def test_relative_representation_loss_aligns_too(setup):
    _, sub, teacher = setup
    cache = cache_teacher(teacher, PLAN, random_batches(4))
    before = measure(teacher, sub.model, PLAN, cache, "relative")
    settings = AlignSettings(lr=1e-2, alpha=1.0, beta=0.0, rep_loss="relative")
    align(teacher, sub.model, PLAN, cache, settings, epochs=5)
    after = measure(teacher, sub.model, PLAN, cache, "relative")
    assert after["rep"] < 0.9 * before["rep"]


def test_decision_rows_index_the_token_before_each_first_answer_token():
    # Right-padded rows of 5, 3 and 4 real tokens; answers start at positions 3, 2 and 1.
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    labels = torch.full((3, 5), -100)
    labels[0, 3:5], labels[1, 2], labels[2, 1:4] = 7, 7, 7
    # Flattened real tokens: row 0 at 0..4, row 1 at 5..7, row 2 at 8..11.
    assert decision_rows({"attention_mask": mask, "labels": labels}).tolist() == [2, 6, 8]


def test_the_option_weight_aligns_how_the_models_rank_the_options(setup):
    _, sub, teacher = setup
    batches = random_batches(4)
    for batch in batches:  # every row's last real token is its answer; options 3 and 11
        labels = torch.full_like(batch["input_ids"], -100)
        last = batch["attention_mask"].sum(dim=1) - 1
        labels[torch.arange(len(last)), last] = 3
        batch["labels"] = labels
    cache = cache_teacher(teacher, PLAN, batches, option_ids=(3, 11))
    before = measure(teacher, sub.model, PLAN, cache)
    # Only the option term weighs: it alone must fall.
    settings = AlignSettings(lr=1e-3, alpha=0.0, beta=1e-9, option_weight=1.0, data="task")
    align(teacher, sub.model, PLAN, cache, settings, epochs=10)
    after = measure(teacher, sub.model, PLAN, cache)
    assert after["options"] < 0.1 * before["options"]  # measured: 7.4e-4 -> 3.4e-6
    assert "options" not in measure(teacher, sub.model, PLAN, cache_teacher(teacher, PLAN, batches))


def test_realign_subset_is_seeded_and_bounded():
    cache = cache_teacher(tiny_model(), PLAN, random_batches(10))
    settings = AlignSettings(realign_samples=9, batch_size=3)
    first = realign_indices(cache, settings, round_number=5)
    assert first == realign_indices(cache, settings, round_number=5)
    assert len(first) == 3 and len(set(first)) == 3


def test_realign_trains_the_chosen_subset_and_renews_a_stale_cache(setup, tmp_path):
    """Realignment runs ``E_r`` epochs over ``realign_indices``; the teacher cache is kept
    unless trained bottom layers (FedOT's first adapter layer) feed the emulator."""
    full, sub, teacher = setup
    cache = cache_teacher(teacher, PLAN, random_batches(6))
    settings = AlignSettings(realign_samples=6, batch_size=3, realign_epochs=2)
    kept, result = realign(teacher, sub.model, PLAN, cache, settings, round_number=5,
                           lora_layers=sub.emulator_layers)
    assert kept is cache and result["steps"] == 2 * len(realign_indices(cache, settings, 5)) == 4

    bottom = dataclasses.replace(PLAN, first_adapter_layers=1, groups=[[1, 3], [5, 7]])
    fedot = make_sub_llm(full, bottom, tmp_path / "fedot")
    cache = cache_teacher(teacher, bottom, random_batches(6))
    renewed, _ = realign(teacher, fedot.model, bottom, cache, settings, round_number=5,
                         lora_layers=fedot.emulator_layers)
    assert renewed is not cache and len(renewed.batches) == len(cache.batches)


def test_bad_settings():
    with pytest.raises(ValueError):
        AlignSettings(alpha=0, beta=0)
    with pytest.raises(ValueError):
        AlignSettings(lr=0)
    with pytest.raises(ValueError, match="option_weight must be >= 0"):
        AlignSettings(option_weight=-1.0)
    with pytest.raises(ValueError, match="rep_loss"):
        AlignSettings(rep_loss="cosine")
