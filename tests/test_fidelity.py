"""The gradient-fidelity probe (fedsoda.fidelity) on tiny random models."""

import copy
import math

import pytest
import torch

from conftest import random_batches, tiny_model
from fedsoda.fidelity import cosine_and_ratio, gradient_fidelity, relative_error
from fedsoda.surgery.lora import attach_lora, load_lora_state, lora_state
from fedsoda.surgery.quantize import quantize_nf4
from fedsoda.surgery.subllm import keep_layers

ADAPTER = [4, 5]


def labelled_batches():
    """Random sequences whose last 4 real tokens are the answer."""
    batches = random_batches(count=2, batch=4, seq=12)
    for batch in batches:
        labels = batch["input_ids"].clone()
        labels[:, :8] = -100
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batches


@pytest.fixture(scope="module")
def full():
    return tiny_model(layers=6)


@pytest.fixture(scope="module")
def teacher(full):
    """The full model with an adapter LoRA whose B is not zero (so A has gradients too)."""
    model = attach_lora(copy.deepcopy(full), ADAPTER)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval()


def client_with(model, layers, teacher, full_layers=ADAPTER):
    client = attach_lora(model, layers)
    state = lora_state(teacher, full_layers)
    load_lora_state(client, {k.replace(f".layers.{f}.", f".layers.{c}."): v
                             for c, f in zip(layers, full_layers, strict=True)
                             for k, v in state.items() if f".layers.{f}." in k})
    return client


def test_cosine_ratio_and_error_against_hand_computed_cases():
    cosine, ratio = cosine_and_ratio([torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])])
    assert cosine == pytest.approx(1 / math.sqrt(2)) and ratio == pytest.approx(1 / math.sqrt(2))
    # Split across tensors, the vectors are the concatenation: (3, 4) against (3, -4).
    cosine, ratio = cosine_and_ratio([torch.tensor([3.0]), torch.tensor([4.0])],
                                     [torch.tensor([3.0]), torch.tensor([-4.0])])
    assert cosine == pytest.approx(-7 / 25) and ratio == pytest.approx(1.0)
    # Hidden states (1 row, 3 tokens, width 1): the first token is left out, so is padding.
    client = [torch.tensor([[[100.0], [1.0], [2.0]]])]
    full = [torch.tensor([[[0.0], [1.0], [0.0]]])]
    assert relative_error(client, full, [torch.tensor([[1, 1, 1]])]) == pytest.approx(2.0)
    assert relative_error(client, full, [torch.tensor([[1, 1, 0]])]) == pytest.approx(0.0)


def test_the_full_model_as_client_agrees_exactly_and_is_left_untouched(full, teacher):
    client = client_with(copy.deepcopy(full), ADAPTER, teacher)
    client.train()
    figures = gradient_fidelity(client, ADAPTER, teacher, ADAPTER, labelled_batches())
    assert figures["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert figures["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert figures["loss_client"] == pytest.approx(figures["loss_full"], abs=1e-6)
    assert set(figures["layers"]) == {"4", "5"} and figures["examples"] == 8
    assert all(value == 0.0 for value in figures["input_error"].values())
    assert figures["emulator_error"] == 0.0  # layer 4 is fed by layers 0-3
    assert client.training and not teacher.training  # modes as they were found
    assert not any(p.requires_grad or p.grad is not None
                   for model in (client, teacher) for p in model.parameters())


def test_stated_tolerances_of_bf16_and_nf4_copies_of_the_full_model(full, teacher):
    # bf16 keeps 8 significant bits: the gradient direction survives to 1e-3; NF4 (4 bits
    # per weight, random weights here, the worst case for its normal-quantile codebook)
    # keeps it to 0.15 and the hidden states to 0.4 relative error.
    bf16 = client_with(copy.deepcopy(full).to(torch.bfloat16), ADAPTER, teacher)
    figures = gradient_fidelity(bf16, ADAPTER, teacher, ADAPTER, labelled_batches())
    assert figures["cosine"] >= 0.999 and abs(figures["norm_ratio"] - 1) < 0.01
    assert 0 < figures["emulator_error"] < 0.02
    nf4 = client_with(quantize_nf4(full), ADAPTER, teacher)
    figures = gradient_fidelity(nf4, ADAPTER, teacher, ADAPTER, labelled_batches())
    assert 0.85 <= figures["cosine"] < 0.999
    assert 0.02 < figures["emulator_error"] < 0.4


def test_a_pruned_client_maps_its_layers_to_the_full_models(full, teacher):
    # Client layers 0, 1, 2, 3 are full layers 0, 1, 4, 5: the "emulator" drops 2 and 3.
    pruned = client_with(keep_layers(full, [0, 1, 4, 5]), [2, 3], teacher)
    figures = gradient_fidelity(pruned, [2, 3], teacher, ADAPTER, labelled_batches())
    assert set(figures["layers"]) == {"4", "5"}
    assert figures["emulator_error"] == figures["input_error"]["4"] > 0.05
    assert figures["cosine"] < 0.999
    with pytest.raises(ValueError, match="2 client adapter layers against 1"):
        gradient_fidelity(pruned, [2, 3], teacher, [4], labelled_batches())


def option_batches(option_ids):
    """Prompts of 8 tokens, then a one-token answer that is one of the options."""
    batches = random_batches(count=2, batch=4, seq=10)
    for k, batch in enumerate(batches):
        batch["attention_mask"][:] = 1
        answers = torch.tensor([option_ids[(row + k) % 2] for row in range(4)])
        batch["input_ids"][:, 8] = answers
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 8] = answers
        batch["labels"] = labels
    return batches


def test_option_loss_by_hand(full):
    """Cross-entropy over the two option logits at the position before the answer, computed
    here from the whole model's logits."""
    from fedsoda.fidelity import option_loss

    options = [11, 42]
    batch = option_batches(options)[0]
    with torch.no_grad():
        logits = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        picked = logits[:, 7, options].double()
        targets = torch.tensor([0, 1, 0, 1])
        expected = -(picked.log_softmax(-1)[torch.arange(4), targets]).mean()
        assert option_loss(full, batch, options).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="none of the option tokens"):
        option_loss(full, batch, [11, 43])


def test_ranking_loss_by_hand_and_blind_to_a_shift_of_every_margin(full):
    from fedsoda.fidelity import ranking_loss

    options = [11, 42]
    batch = option_batches(options)[0]  # answers 11, 42, 11, 42: rows 1 and 3 are "second"
    with torch.no_grad():
        logits = full(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        m = (logits[:, 7, 42] - logits[:, 7, 11]).double().tolist()
        pairs = [(i, j) for i in (1, 3) for j in (0, 2)]  # (second-option row, first-option row)
        expected = sum(math.log1p(math.exp(m[j] - m[i])) for i, j in pairs) / 4
        assert ranking_loss(full, batch, options).item() == pytest.approx(expected, rel=1e-5)
        # The same answer on every row: no pair, nothing to rank.
        same = {**batch, "labels": torch.where(batch["labels"] == 42, 11, batch["labels"])}
        assert ranking_loss(full, same, options).item() == 0.0
        # A bias on the second option's logit shifts every margin and leaves the loss.
        head = full.lm_head.weight
        bias = torch.zeros(head.shape[0])
        bias[42] = 3.0
        shifted = torch.nn.Linear(head.shape[1], head.shape[0], bias=True)
        shifted.weight, shifted.bias = head, torch.nn.Parameter(bias)
        original, full.lm_head = full.lm_head, shifted
        try:
            assert ranking_loss(full, batch, options).item() == pytest.approx(expected, rel=1e-5)
        finally:
            full.lm_head = original


def test_option_figures_are_one_for_the_full_model_itself(teacher, full):
    client = client_with(copy.deepcopy(full), ADAPTER, teacher)
    figures = gradient_fidelity(client, ADAPTER, teacher, ADAPTER, option_batches([11, 42]),
                                option_ids=[11, 42])
    assert figures["options"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert figures["options"]["norm_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert set(figures["options"]["layers"]) == {"4", "5"}
    assert figures["ranking"]["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_option_token_ids():
    from fedsoda.fidelity import option_token_ids

    class Tokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": {" negative": [7], " positive": [9], " maybe so": [3, 4],
                                  " no": [7]}[text]}

    assert option_token_ids(Tokenizer(), (" negative", " positive")) == [7, 9]
    assert option_token_ids(Tokenizer(), (" negative", " maybe so")) is None  # two tokens
    assert option_token_ids(Tokenizer(), (" negative", " no")) is None  # the same token
