"""One path from a recipe to its client model (a run, `fedsoda bench`, the planner), and SGP's
one entry point in fedsoda.surgery, shared by `fedsoda prune` and a run through one cache.

Layouts and sizes are worked out by hand for the tiny model: 10 layers of hidden 32, MLP 64,
4 query and 2 key/value heads (head 8), vocabulary 96, tied embeddings, no biases.
"""

import itertools

import pytest
import torch

from conftest import tiny_model
from fedsoda.commands import model_prep
from fedsoda.methods import RECIPES
from fedsoda.methods.client_model import build_client_model, layout_plan
from fedsoda.models import load
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.quantize import dense_bytes, nf4_storage_bytes
from fedsoda.surgery.sgp import plan_cache_path
from fedsoda.surgery.subllm import build_sub_llm

SETTINGS = PruneSettings(n=2, p=2, adapter_layers=3, samples=8, seq_len=32)
# Per decoder layer: q 32x32, k and v 32x16, o 32x32, gate and up 32x64, down 64x32, 2 norms.
LAYER = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
TINY_PARAMS = 10 * LAYER + 96 * 32 + 32  # + the (tied) embedding and the final norm


@pytest.mark.parametrize(("method", "groups", "adapter", "emulator"), [
    ("fedpetuning", [], list(range(10)), []),
    # Emulator 1..7 (FedOT trains layer 0): stride 3.5, kept 0 1 4 5 8 9.
    ("fedot", [[1, 3], [5, 7]], [0, 4, 5], [1, 2, 3]),
    # Emulator 0..6: kept 0 3 4 7 8 9; every kept emulator layer has LoRA.
    ("fedbiot", [[0, 2], [4, 6]], [3, 4, 5], [0, 1, 2]),
    # Without measuring, SGP's windows sit where FedBiOT's do; LoRA on the starts 0 and 4.
    ("fedsoda", [[0, 2], [4, 6]], [3, 4, 5], [0, 2]),
])
def test_in_memory_and_stored_client_models_are_built_alike(method, groups, adapter, emulator,
                                                           tmp_path):
    recipe, full = RECIPES[method], tiny_model()
    sketch = build_client_model(recipe, "tiny", full, None, SETTINGS, None, folder=None,
                                measure_similarity=False)
    stored = build_client_model(recipe, "tiny", full, None, SETTINGS, None, folder=tmp_path,
                                measure_similarity=False)
    for sub in (sketch, stored):
        assert sub.plan.groups == groups
        assert (sub.adapter_layers, sub.emulator_layers) == (adapter, emulator)
        assert sub.quantization == recipe.quantization
    shapes = {name: tuple(t.shape) for name, t in stored.adapter_lora().items()}
    assert {name: tuple(t.shape) for name, t in sketch.adapter_lora().items()} == shapes
    assert layout_plan(recipe, "tiny", 10, SETTINGS).groups == groups


def test_storage_counts_weights_not_lora():
    full = tiny_model()
    sketch = build_client_model(RECIPES["fedpetuning"], "tiny", full, None, SETTINGS, None,
                                folder=None)
    assert any("lora_" in name for name, _ in sketch.model.named_parameters())
    assert dense_bytes(sketch.model, 2) == 2 * TINY_PARAMS
    soda = build_client_model(RECIPES["fedsoda"], "tiny", full, None, SETTINGS, None,
                              folder=None, measure_similarity=False)
    assert nf4_storage_bytes(soda.model) == nf4_storage_bytes(build_sub_llm(full, soda.plan.kept_layers))


def test_meta_device_models_build_for_the_planner():
    with torch.device("meta"):
        full = tiny_model()
    sub = build_client_model(RECIPES["fedsoda"], "planner", full, None, SETTINGS, None,
                             folder=None, measure_similarity=False)
    assert sub.plan.sub_num_layers == 6 and next(sub.model.parameters()).is_meta


def test_settings_the_model_cannot_take_fail_before_any_build():
    with pytest.raises(ValueError, match="use p <= 1"):
        layout_plan(RECIPES["fedsoda"], "tiny", 10, PruneSettings(n=3, p=2))
    with pytest.raises(ValueError, match="adapter_layers > 1"):
        layout_plan(RECIPES["fedot"], "tiny", 10, PruneSettings(n=2, p=2, adapter_layers=1))
    assert layout_plan(RECIPES["fedpetuning"], "tiny", 10, PruneSettings(n=3, p=4)).groups == []


def test_the_plan_cache_key_is_model_data_and_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path))
    key = plan_cache_path("m0d3l", "d4t4", PruneSettings(n=2, p=3, adapter_layers=4, token="all"))
    assert key == tmp_path / "plans" / "m0d3l-d4t4-n2-p3-a4-all.json"


def test_prune_and_a_run_share_one_sgp_plan(tiny_model_dir, shared_data, tmp_path, monkeypatch):
    first = model_prep.prune(str(tiny_model_dir), SETTINGS, str(shared_data),
                             str(tmp_path / "plan.json"))
    # The least summed distance over every pair of disjoint windows [l, l+2] in layers 0..6.
    distance = {d["start"]: d["distance"] for d in first.distances}
    best = min((pair for pair in itertools.combinations(distance, 2) if pair[1] - pair[0] > 2),
               key=lambda pair: distance[pair[0]] + distance[pair[1]])
    assert first.groups == [[start, start + 2] for start in best]

    def no_measuring(*_args, **_kwargs):
        raise AssertionError("the run must take the plan `fedsoda prune` cached")

    monkeypatch.setattr("fedsoda.surgery.sgp.similarity_plan", no_measuring)
    full, tokenizer = load(str(tiny_model_dir))
    sub = build_client_model(RECIPES["fedsoda"], str(tiny_model_dir), full, tokenizer, SETTINGS,
                             str(shared_data), folder=None)
    assert (sub.plan.groups, sub.plan.model_hash) == (first.groups, first.model_hash)
    assert sub.emulator_layers == [s for _, s in sub.plan.index_map]
