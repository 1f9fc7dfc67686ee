"""Sub-LLM surgery for every supported family: layer removal, renumbering, generation."""

import pytest
import torch

from conftest import FAMILY_CONFIGS, random_batches, tiny_model
from fedsoda.surgery.subllm import build_sub_llm

KEPT = [0, 3, 4, 5, 8, 9]  # groups [0, 2] and [5, 7] of a 10-layer model


def identity_hooks(model, removed):
    """Make removed layers pass their input through (an independent way to 'prune')."""
    layers = model.model.layers
    return [layers[i].register_forward_hook(lambda _m, args, _out: args[0]) for i in removed]


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_sub_llm_equals_full_model_with_removed_layers_skipped(family):
    full = tiny_model(family)
    sub = build_sub_llm(full, KEPT)
    batch = random_batches(1)[0]
    handles = identity_hooks(full, [i for i in range(10) if i not in KEPT])
    with torch.no_grad():
        expected = full(**batch).logits
        got = sub(**batch).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(full.model.layers) == 10, "the full model must not be changed"


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_layers_renumbered_and_config_pruned(family):
    full = tiny_model(family)
    sub = build_sub_llm(full, KEPT)
    assert sub.config.num_hidden_layers == 6
    assert [layer.self_attn.layer_idx for layer in sub.model.layers] == list(range(6))
    if getattr(full.config, "layer_types", None):
        assert sub.config.layer_types == [full.config.layer_types[i] for i in KEPT]


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_generate_with_kv_cache_matches_no_cache(family):
    sub = build_sub_llm(tiny_model(family), KEPT)
    prompt = random_batches(1, batch=1)[0]["input_ids"]
    with torch.no_grad():
        cached = sub.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = sub.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(cached, plain)


def test_bad_kept_layers():
    with pytest.raises(ValueError, match="out of range"):
        build_sub_llm(tiny_model(), [0, 12])
