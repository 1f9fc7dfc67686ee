"""Layer-output capture and window distances, checked against HF hidden states and numpy."""

import numpy as np
import pytest
import torch

from conftest import random_batches, tiny_model
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.similarity import angular_distance, similarity_plan, window_distances


def test_angular_distance_by_hand():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 0.0], [-1.0, 0.0]])
    assert angular_distance(a, b).tolist() == pytest.approx([0.5, 0.0, 1.0])


def reference_distances(model, batches, n, emulator, token):
    """Distances from HF ``output_hidden_states``: entry ``l + 1`` is layer ``l``'s output
    for every layer but the last (whose entry is after the final norm, never used here)."""
    per_start = {start: [] for start in range(emulator - n)}
    with torch.no_grad():
        for batch in batches:
            out = model(**batch, output_hidden_states=True)
            hidden = [h.double().numpy() for h in out.hidden_states]
            mask = batch["attention_mask"].numpy()
            for row in range(mask.shape[0]):
                real = np.flatnonzero(mask[row])
                positions = real[-1:] if token == "last" else real
                for start in per_start:
                    a, b = hidden[start + 1][row, positions], hidden[start + n + 1][row, positions]
                    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
                    per_start[start].append(np.mean(np.arccos(np.clip(cos, -1, 1)) / np.pi))
    return [float(np.mean(values)) for values in per_start.values()]


@pytest.mark.parametrize("token", ["last", "all"])
def test_window_distances_match_hidden_states(token):
    model, batches = tiny_model("llama", layers=8), random_batches()
    got = window_distances(model, batches, n=2, emulator_layers=6, token=token)
    assert got == pytest.approx(reference_distances(model, batches, 2, 6, token), abs=1e-6)


def test_similarity_plan_picks_optimum_of_reported_distances():
    model, batches = tiny_model("qwen2", layers=10), random_batches()
    plan = similarity_plan(model, batches, PruneSettings(n=2, p=2, adapter_layers=2), "tiny")
    assert [d["start"] for d in plan.distances] == list(range(6))
    assert plan.samples == 6 and plan.sub_num_layers == 6
    cost = {d["start"]: d["distance"] for d in plan.distances}
    chosen = sum(cost[s] for s, _ in plan.groups)
    for a in range(6):
        for b in range(a + 3, 6):
            assert chosen <= cost[a] + cost[b] + 1e-12
