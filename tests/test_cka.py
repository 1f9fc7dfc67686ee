"""Linear CKA and block influence (fedsoda.surgery.cka).

Expected values come from hand arithmetic, the HSIC (Gram-matrix) form of CKA, and HF's own
``hidden_states`` (whose entry ``l + 1`` is the output of layer ``l`` except for the last
layer, which is taken after the final norm).
"""

import math

import pytest
import torch

from conftest import random_batches, tiny_model
from fedsoda.models import decoder_layers
from fedsoda.surgery.cka import (
    block_influence,
    cka_matrix,
    layer_outputs,
    linear_cka,
    probe_layers,
    token_mask,
)


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA as HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels and H = I - 11^T/n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n

    def hsic(a, b):
        return torch.trace(a @ a.T @ h @ b @ b.T @ h)

    return float(hsic(x, y) / torch.sqrt(hsic(x, x) * hsic(y, y)))


def hidden_states(model, batch) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, use_cache=False).hidden_states


# ---------------------------------------------------------------- linear_cka

def test_linear_cka_hand_computed():
    # Xc = [-1, 0, 1]; Yc = [[0, -1], [-1, 0], [1, 1]]; Yc^T Xc = [1, 2] -> 5;
    # ||Xc^T Xc|| = 2; Yc^T Yc = [[2, 1], [1, 2]] -> sqrt(10). CKA = 5 / (2 sqrt 10).
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    assert linear_cka(x, y) == pytest.approx(5 / (2 * math.sqrt(10)), abs=1e-12)


def test_linear_cka_matches_the_hsic_form():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 7, generator=generator)
    y = x @ torch.randn(7, 5, generator=generator) + 0.5 * torch.randn(40, 5, generator=generator)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), abs=1e-10)


def test_linear_cka_invariances_identity_and_symmetry():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    noise = torch.randn(50, 6, generator=generator, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(6, 6, generator=generator, dtype=torch.float64)) + 0.3 * noise
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    reference = linear_cka(x, y)
    assert 0.05 < reference < 0.95
    assert linear_cka(x @ q, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, y @ q) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(3.7 * x, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 0.01 * y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x + 5.0, y) == pytest.approx(reference, abs=1e-10)  # columns are centred
    assert linear_cka(y, x) == pytest.approx(reference, abs=1e-12)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_rejects_bad_shapes_and_constants():
    with pytest.raises(ValueError, match="same T"):
        linear_cka(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(4, 2), torch.randn(4, 2))


def test_cka_matrix_is_pairwise_linear_cka():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(30, 4, generator=generator)
    outputs = [base, base @ torch.randn(4, 4, generator=generator), torch.randn(30, 3, generator=generator)]
    matrix = cka_matrix(outputs)
    assert matrix.shape == (3, 3) and matrix.dtype == torch.float64
    for i in range(3):
        for j in range(3):
            # float64 throughout, as the HSIC form: equal to rounding
            assert matrix[i, j].item() == pytest.approx(hsic_cka(outputs[i], outputs[j]), abs=1e-12)


# ---------------------------------------------------------------- token choice

def test_token_mask_drops_the_first_real_token_with_either_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert token_mask(mask, skip_first=False).tolist() == mask.bool().tolist()
    assert token_mask(mask).long().tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 1, 0, 0, 0]]


# ---------------------------------------------------------------- layer outputs

def test_layer_outputs_are_the_decoder_layer_outputs_at_real_tokens():
    model = tiny_model(layers=4)
    batches = random_batches()  # 2 batches of 3 x 12; row 0 has 8 real tokens
    outputs = layer_outputs(model, batches, skip_first=True, max_tokens=None)
    assert len(outputs) == 4
    assert all(x.shape == (2 * (7 + 11 + 11), 32) and x.dtype == torch.float32 for x in outputs)
    expected = [[] for _ in range(4)]
    for batch in batches:
        states = hidden_states(model, batch)
        for sample, real in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            for layer in range(4):
                expected[layer].append(states[layer + 1][sample, 1:real])
    expected = [torch.cat(rows) for rows in expected]
    for layer in range(3):
        torch.testing.assert_close(outputs[layer], expected[layer], rtol=1e-5, atol=1e-5)
    # The last hidden_states entry is after the final norm; the hook sees the layer itself.
    assert not torch.allclose(outputs[3], expected[3], atol=1e-3)
    norm = model.model.norm
    with torch.no_grad():
        torch.testing.assert_close(norm(outputs[3]), expected[3], rtol=1e-5, atol=1e-5)


def test_layer_outputs_with_the_first_token_and_no_hooks_left_behind():
    model = tiny_model(layers=3)
    batches = random_batches()
    outputs = layer_outputs(model, batches, skip_first=False, max_tokens=None)
    # Checked before hidden_states(): transformers installs its own hooks for those.
    assert all(not layer._forward_hooks for layer in decoder_layers(model))
    assert outputs[0].shape[0] == 2 * (8 + 12 + 12)
    first = hidden_states(model, batches[0])[1][0, 0]
    torch.testing.assert_close(outputs[0][0], first, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_outputs():
    model = tiny_model(layers=3)
    batch = random_batches(count=1)[0]
    padded = layer_outputs(model, [batch], max_tokens=None)
    alone = [{"input_ids": batch["input_ids"][i:i + 1, :real],
              "attention_mask": batch["attention_mask"][i:i + 1, :real]}
             for i, real in enumerate(batch["attention_mask"].sum(dim=1).tolist())]
    unpadded = layer_outputs(model, alone, max_tokens=None)
    for a, b in zip(padded, unpadded, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_token_cap_is_a_deterministic_subsample_shared_by_all_layers():
    model = tiny_model(layers=3)
    batches = random_batches()
    full = layer_outputs(model, batches, max_tokens=None)
    capped = layer_outputs(model, batches, max_tokens=20, seed=3)
    again = layer_outputs(model, batches, max_tokens=20, seed=3)
    assert all(x.shape[0] == 20 for x in capped)
    for a, b in zip(capped, again, strict=True):
        assert torch.equal(a, b)
    # Each kept row is a row of the full set, at the same positions for every layer, in order.
    positions = []
    for layer in range(3):
        distance = torch.cdist(capped[layer], full[layer])
        assert distance.min(dim=1).values.max() < 1e-3  # other rows are ~0.1 away
        positions.append(distance.argmin(dim=1).tolist())
    assert positions[0] == positions[1] == positions[2] == sorted(positions[0])


# ---------------------------------------------------------------- block influence

def test_block_influence_matches_hidden_states_and_is_zero_for_an_identity_layer():
    model = tiny_model(layers=5)
    with torch.no_grad():
        layer = decoder_layers(model)[2]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()  # the residual stream passes layer 2 unchanged
    batches = random_batches()
    influence = block_influence(model, batches)
    assert len(influence) == 5
    assert influence[2] == pytest.approx(0.0, abs=1e-6)
    assert all(value > 1e-3 for i, value in enumerate(influence) if i != 2)
    # 1 - cos(input, output) from hidden_states, layers 0..3, tokens 1.. of every sample.
    totals, count = torch.zeros(4, dtype=torch.float64), 0
    for batch in batches:
        states = hidden_states(model, batch)
        for sample, real in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
            for index in range(4):
                before = states[index][sample, 1:real].double()
                after = states[index + 1][sample, 1:real].double()
                totals[index] += (1 - torch.cosine_similarity(before, after, dim=-1)).sum()
            count += real - 1
    for index in range(4):
        assert influence[index] == pytest.approx((totals[index] / count).item(), abs=1e-6)


def test_one_probe_gives_outputs_and_influence_from_the_same_pass():
    model = tiny_model(layers=3)
    batches = random_batches()
    probe = probe_layers(model, batches, max_tokens=10)
    assert probe.tokens == 2 * (7 + 11 + 11)
    assert all(x.shape[0] == 10 for x in probe.outputs)
    assert probe.influence == pytest.approx(block_influence(model, batches), abs=1e-12)


def test_nothing_to_measure_is_an_error():
    model = tiny_model(layers=2)
    batch = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.tensor([[1, 0]])}
    with pytest.raises(ValueError, match="no tokens"):
        layer_outputs(model, [batch])
