"""FedPruner+ block pruning: a layer without a block computes the full layer minus that block.

Expected values come from the untouched model's own modules, composed by hand per family
(Gemma-3 normalises each block's output before adding it to the residual).
"""

import copy
import gc
import weakref

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DummyLayer

from conftest import random_batches, tiny_model
from fedsoda.surgery.blocks import (
    BLOCKS,
    DroppedAttention,
    block_numel,
    block_units,
    blocks_to_units,
    drop_blocks,
    kept_blocks,
    units_to_blocks,
)
from fedsoda.surgery.lora import attach_lora, set_trainable
from fedsoda.surgery.subllm import keep_layers

FAMILIES = ["llama", "qwen2", "mistral", "gemma3_text"]
LAYER = 1  # the layer whose block is dropped in the single-layer tests


def _blocks_with(layers: int, layer: int, keep: str) -> tuple[str, ...]:
    return tuple(keep if i == layer else "attn+mlp" for i in range(layers))


def _layer_io(model, batch, layer: int, submodule: str | None = None):
    """Input and output of decoder layer ``layer`` (or of its ``submodule``) in one pass."""
    seen = {}

    def record_input(_module, args, kwargs):  # returns None: the input is left as it is
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def record_output(_module, _inputs, output):
        seen["out"] = output[0] if isinstance(output, tuple) else output

    target = model.model.layers[layer]
    watched = getattr(target, submodule) if submodule else target
    hooks = [target.register_forward_pre_hook(record_input, with_kwargs=True),
             watched.register_forward_hook(record_output)]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    return seen["in"], seen["out"]


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _numel_under(model, prefixes: tuple[str, ...]) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(prefixes))


def _norms(family: str, block: str) -> tuple[str, ...]:
    """The norms that belong to a block, read off each family's decoder-layer forward."""
    if family == "gemma3_text":
        return {"attn": ("input_layernorm", "post_attention_layernorm"),
                "mlp": ("pre_feedforward_layernorm", "post_feedforward_layernorm")}[block]
    return {"attn": ("input_layernorm",), "mlp": ("post_attention_layernorm",)}[block]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_without_attention_computes_residual_plus_mlp(family):
    full = tiny_model(family, layers=4)
    pruned = drop_blocks(copy.deepcopy(full), _blocks_with(4, LAYER, "mlp"))
    batch = random_batches(count=1)[0]
    h, out = _layer_io(pruned, batch, LAYER)
    original = full.model.layers[LAYER]
    with torch.no_grad():
        if family == "gemma3_text":
            expected = h + original.post_feedforward_layernorm(
                original.mlp(original.pre_feedforward_layernorm(h)))
        else:
            expected = h + original.mlp(original.post_attention_layernorm(h))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # The layers before are untouched, so the pruned layer saw the full model's input.
    torch.testing.assert_close(h, _layer_io(full, batch, LAYER)[0], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_layer_without_mlp_computes_residual_plus_attention(family):
    full = tiny_model(family, layers=4)
    pruned = drop_blocks(copy.deepcopy(full), _blocks_with(4, LAYER, "attn"))
    batch = random_batches(count=1)[0]
    h, attention = _layer_io(full, batch, LAYER, submodule="self_attn")
    h_pruned, out = _layer_io(pruned, batch, LAYER)
    torch.testing.assert_close(h_pruned, h, rtol=0, atol=0)
    with torch.no_grad():
        if family == "gemma3_text":
            expected = h + full.model.layers[LAYER].post_attention_layernorm(attention)
        else:
            expected = h + attention
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("block", "module", "keep"), [("attn", "self_attn", "mlp"),
                                                       ("mlp", "mlp", "attn")])
def test_dropping_a_block_frees_exactly_its_parameters(family, block, module, keep):
    model = tiny_model(family, layers=4)
    layer = f"model.layers.{LAYER}."
    owned = (f"{layer}{module}.",) + tuple(f"{layer}{norm}." for norm in _norms(family, block))
    expected_drop = _numel_under(model, owned)
    assert expected_drop > 0
    before = _numel(model)
    assert block_numel(model)[LAYER][block] == expected_drop
    weight = weakref.ref(next(getattr(model.model.layers[LAYER], module).parameters()))

    drop_blocks(model, _blocks_with(4, LAYER, keep))
    gc.collect()
    assert _numel(model) == before - expected_drop
    assert weight() is None  # really gone from memory, not just hidden
    assert _numel_under(model, owned) == 0
    assert block_numel(model)[LAYER] == {block: 0, keep: block_numel(tiny_model(family, 4))[LAYER][keep]}
    assert kept_blocks(model) == _blocks_with(4, LAYER, keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_matches_uncached_with_dropped_attention(family):
    # Layer 0 (whose cache slot get_seq_length reads by default) and the last layer (Gemma-3's
    # only full-attention layer) lose their attention; layer 2 loses its MLP.
    model = tiny_model(family, layers=6)
    drop_blocks(model, ("mlp", "attn+mlp", "attn", "attn+mlp", "attn+mlp", "mlp"))
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding: the masks must use the true cached length
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
    cached = model.generate(ids, **settings)
    uncached = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")
    kinds = [isinstance(layer, DummyLayer) for layer in cached.cache.layers]
    assert kinds == [True, False, False, False, False, True]


def test_a_static_cache_frees_the_slots_of_dropped_attention():
    model = drop_blocks(tiny_model("llama", layers=4), ("attn+mlp", "mlp", "attn+mlp", "mlp"))
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(4))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
    static = model.generate(ids, cache_implementation="static", **settings)
    uncached = model.generate(ids, use_cache=False, **settings)
    assert torch.equal(static.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(uncached.logits),
                               rtol=0, atol=1e-5)
    assert [isinstance(layer, DummyLayer) for layer in static.cache.layers] == [False, True] * 2


def test_a_model_without_any_attention_generates_without_a_cache():
    model = drop_blocks(tiny_model("llama", layers=2), ("mlp", "mlp"))
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # no attention: each position's logits depend on its own token only
        greedy = model(ids[:, -1:]).logits[:, -1].argmax(-1)
    assert out.shape == (2, 8) and torch.equal(out[:, 5], greedy)


def test_a_lazily_grown_cache_also_skips_dropped_layers():
    model = tiny_model("llama", layers=4)
    drop_blocks(model, ("mlp", "attn+mlp", "mlp", "attn+mlp"))
    ids = torch.randint(3, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(ids).logits[0, -1]
        cache = DynamicCache()  # no config: its layers are created as they are written
        model(ids[:, :-1], cache=cache, use_cache=True)
        step = model(ids[:, -1:], cache=cache, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, whole, rtol=0, atol=1e-5)
    assert [isinstance(layer, DummyLayer) for layer in cache.layers] == [True, False, True, False]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_lora_model_without_an_attention_block_still_trains(family):
    model = attach_lora(tiny_model(family, layers=4), layers=[0, 1, 2, 3])
    dropped = f".layers.{LAYER}.self_attn."
    assert any(dropped in name and "lora_" in name for name, _ in model.named_parameters())
    drop_blocks(model, _blocks_with(4, LAYER, "mlp"))
    assert not any(dropped in name for name, _ in model.named_parameters())
    assert kept_blocks(model) == _blocks_with(4, LAYER, "mlp")

    trainable = set_trainable(model, [LAYER])
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = random_batches(count=1)[0]
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    mlp_b = [g for name, g in grads.items() if f".layers.{LAYER}.mlp." in name and "lora_B" in name]
    assert len(mlp_b) == 3 and all(g is not None and g.abs().sum() > 0 for g in mlp_b)
    assert all(f".layers.{LAYER}.mlp." in name for name in grads)
    optimizer.step()


def test_units_and_blocks_convert_both_ways():
    assert block_units(2) == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    units = [(4, "mlp"), (0, "attn"), (4, "attn"), (2, "mlp")]
    layers, blocks = units_to_blocks(units)
    assert (layers, blocks) == ((0, 2, 4), ("attn", "mlp", "attn+mlp"))
    assert set(blocks) <= set(BLOCKS)
    assert blocks_to_units(layers, blocks) == sorted(units)
    assert blocks_to_units((3, 1), ()) == [(1, "attn"), (1, "mlp"), (3, "attn"), (3, "mlp")]
    assert units_to_blocks(block_units(3)) == ((0, 1, 2), ("attn+mlp",) * 3)
    with pytest.raises(ValueError):
        units_to_blocks([(0, "ffn")])
    with pytest.raises(ValueError):
        blocks_to_units((0, 1), ("attn",))
    with pytest.raises(ValueError):
        block_units(0)


def test_drop_blocks_refuses_bad_requests():
    model = tiny_model("llama", layers=3)
    assert drop_blocks(model, ()) is model and kept_blocks(model) == ("attn+mlp",) * 3
    with pytest.raises(ValueError):
        drop_blocks(model, ("attn", "mlp"))  # one entry per layer
    with pytest.raises(ValueError):
        drop_blocks(model, ("attn", "mlp", "ffn"))
    drop_blocks(model, ("attn", "mlp", "attn+mlp"))
    drop_blocks(model, ("attn", "mlp", "attn+mlp"))  # again: nothing left to drop
    with pytest.raises(ValueError, match="no mlp block left"):
        drop_blocks(model, ("mlp", "attn+mlp", "attn"))
    assert kept_blocks(model) == ("attn", "mlp", "attn+mlp")  # a refused request changes nothing


def test_keep_layers_renumbers_a_dropped_attention_block():
    model = drop_blocks(tiny_model("llama", layers=4), ("attn+mlp", "attn+mlp", "attn+mlp", "mlp"))
    sub = keep_layers(model, [1, 3])
    assert isinstance(sub.model.layers[1].self_attn, DroppedAttention)
    assert sub.model.layers[1].self_attn.layer_idx == 1
    assert kept_blocks(sub) == ("attn+mlp", "mlp")
