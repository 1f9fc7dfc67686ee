"""Remove attention or MLP blocks from decoder layers (FedPruner+'s component-level pruning).

FedPruner+ (issue 15, item 4) treats each layer's attention (MHA) and MLP (FFN) block as a
unit of its own: a client holds, per layer, both blocks or one of them. A dropped block is
deleted from the module tree (its weights, and any LoRA on it, are freed) and replaced by a
parameter-free stand-in whose output is zero, so the residual stream passes through.

Why zeros are exact. Every supported family's decoder layer computes

    h = h + post_a(attn(pre_a(h)))      then      h = h + post_m(mlp(pre_m(h)))

with ``post_*`` the identity in Llama, Qwen2 and Mistral and an RMSNorm in Gemma-3 (its
``post_attention_layernorm`` and ``post_feedforward_layernorm``). A zero block output adds
exactly 0.0, and RMSNorm(0) = 0 * rsqrt(0 + eps) * scale = 0 for any eps > 0, so the layer
returns ``h`` unchanged plus the kept block. The block's pre-norm feeds nothing else and is
replaced by the identity (the stand-in reads only its input's shape); Gemma-3's post-norm of a
dropped block only ever sees zeros and is replaced by the identity too.

The KV cache. A layer without attention has nothing to cache. On its first call with a cache
the stand-in puts a transformers ``DummyLayer`` into its slot of the cache, which frees what
the slot held (a static cache's preallocated tensors) and tells the cache and the mask
builder to skip the slot: ``get_seq_length()`` and the causal masks then read the first
layer that really attends. So ``generate()`` works with a dropped attention block anywhere,
layer 0 included; the tests check that cached decoding gives the logits of uncached decoding.
A model with no attention left at all has no layer to count cached tokens on (and nothing
to cache): ``drop_blocks`` turns caching off in its config and generation config, so
``generate()`` decodes without a cache; asking for one explicitly fails in transformers.

Drop blocks before building an optimizer over the model's parameters: an optimizer (or any
other reference) holding a dropped weight keeps it alive.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import DummyLayer, DynamicLayer

from fedsoda.models import decoder_layers, unwrap
from fedsoda.models.layers import SUPPORTED_FAMILIES

# The same strings as ``fedsoda.methods.assignment.BLOCKS`` (surgery may not import methods):
# per held layer, which blocks it keeps.
BLOCKS = ("attn+mlp", "attn", "mlp")
UNITS = ("attn", "mlp")

# Per family and block: the block's sub-module, then the norms that exist only for it (its
# pre-norm; in Gemma-3 also the post-norm applied to its output), all replaced when dropped.
_PLAIN = {"attn": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}
_BLOCK_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _PLAIN,
    "qwen2": _PLAIN,
    "mistral": _PLAIN,
    # Gemma-3 norms before and after each block (post_attention_layernorm normalises the
    # attention output there, unlike the other families where it is the MLP's pre-norm).
    "gemma3_text": {"attn": ("self_attn", "input_layernorm", "post_attention_layernorm"),
                    "mlp": ("mlp", "pre_feedforward_layernorm", "post_feedforward_layernorm")},
}


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP: outputs zeros shaped like its input."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class DroppedAttention(nn.Module):
    """Stands in for a removed attention block: returns ``(zeros, None)`` as the decoder
    layer expects, and retires the layer's KV-cache slot (see the module docstring).

    ``layer_idx`` is kept so that ``fedsoda.surgery.subllm.keep_layers`` renumbers it with
    the other layers' attention modules.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # transformers 5 passes the cache as `cache`; earlier versions as `past_key_values`.
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if cache is not None:
            _retire_cache_slot(cache, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def _retire_cache_slot(cache, layer_idx: int) -> None:
    layers = getattr(cache, "layers", None)
    if layers is None:  # not a transformers Cache: nothing we know how to retire
        return
    if layer_idx < len(layers):
        if not isinstance(layers[layer_idx], DummyLayer):
            layers[layer_idx] = DummyLayer()
        return
    # A cache built without a config grows its layer list as layers first write to it.
    grow = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
    while len(layers) < layer_idx:
        layers.append(grow())
    layers.append(DummyLayer())


def _family(model: nn.Module) -> str:
    family = getattr(unwrap(model).config, "model_type", None)
    if family not in _BLOCK_MODULES:
        raise TypeError(f"block pruning supports {', '.join(SUPPORTED_FAMILIES)}, "
                        f"not model type {family!r}")
    return family


def _has_block(layer: nn.Module, block: str) -> bool:
    if block == "attn":
        return not isinstance(layer.self_attn, DroppedAttention)
    return not isinstance(layer.mlp, DroppedMLP)


def _blocks_string(attn: bool, mlp: bool) -> str:
    return "attn+mlp" if attn and mlp else "attn" if attn else "mlp"


def kept_blocks(model: nn.Module) -> tuple[str, ...]:
    """Per decoder layer of ``model``, which blocks it still has (a ``BLOCKS`` string)."""
    return tuple(_blocks_string(_has_block(layer, "attn"), _has_block(layer, "mlp"))
                 for layer in decoder_layers(model))


def drop_blocks(model: nn.Module, blocks: Sequence[str]) -> nn.Module:
    """Remove, in place, the blocks each decoder layer does not keep; returns ``model``.

    ``blocks[j]`` (one of ``BLOCKS``) says what layer position ``j`` keeps; ``()`` keeps
    everything (the convention of ``Assignment.blocks``). ``model`` may be PEFT-wrapped: LoRA
    on a dropped block goes with it. A block already dropped cannot be kept again.
    """
    blocks = tuple(blocks)
    if not blocks:
        return model
    layers = decoder_layers(model)
    if len(blocks) != len(layers) or not set(blocks) <= set(BLOCKS):
        raise ValueError(f"blocks must name one of {BLOCKS} for each of the model's "
                         f"{len(layers)} layers, got {blocks}")
    names = _BLOCK_MODULES[_family(model)]
    plan = list(enumerate(zip(layers, (keep.split("+") for keep in blocks), strict=True)))
    for position, (layer, keep) in plan:  # checked first: a refused request changes nothing
        lost = [block for block in keep if not _has_block(layer, block)]
        if lost:
            raise ValueError(f"layer position {position} has no {lost[0]} block left to keep")
    for position, (layer, keep) in plan:
        for block in UNITS:
            if block in keep or not _has_block(layer, block):
                continue
            module, *norms = names[block]
            if block == "attn":
                stand_in = DroppedAttention(getattr(layer.self_attn, "layer_idx", position))
            else:
                stand_in = DroppedMLP()
            setattr(layer, module, stand_in)  # the only reference: the block's weights are freed
            for norm in norms:
                setattr(layer, norm, nn.Identity())
    if not any(_has_block(layer, "attn") for layer in layers):
        _turn_off_cache(unwrap(model))
    return model


@contextmanager
def blocks_dropped(model: nn.Module, blocks: Sequence[str]) -> Iterator[nn.Module]:
    """``drop_blocks`` for the duration of a ``with``, then the very modules put back: a
    layer can be run without a block and then whole again (FedPruner+'s probe measures the
    residual stream after attention as the layer's output with its MLP dropped, which is
    exact by the module docstring's argument for every family)."""
    layers = decoder_layers(model)
    names = _BLOCK_MODULES[_family(model)]
    saved = [(layer, name, getattr(layer, name)) for layer in layers
             for block in UNITS for name in names[block]]
    config = unwrap(model).config
    use_cache = config.use_cache
    drop_blocks(model, blocks)
    try:
        yield model
    finally:
        for layer, name, module in saved:
            setattr(layer, name, module)
        config.use_cache = use_cache


def _turn_off_cache(model: nn.Module) -> None:
    """No layer attends any more: a cache would have no layer to count its tokens on."""
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False


def block_numel(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer, the parameters (LoRA included) its ``attn`` and ``mlp`` blocks
    hold, norms counted with the block they belong to; 0 for a dropped block."""
    names = _BLOCK_MODULES[_family(model)]
    return [{block: sum(p.numel() for name in names[block]
                        for p in getattr(layer, name).parameters())
             for block in UNITS}
            for layer in decoder_layers(model)]


def block_units(num_layers: int) -> list[tuple[int, str]]:
    """Every (layer, block) unit of a model with ``num_layers`` layers, in layer order."""
    if num_layers < 1:
        raise ValueError(f"a model has at least one layer, got {num_layers}")
    return [(layer, block) for layer in range(num_layers) for block in UNITS]


def units_to_blocks(units: Iterable[tuple[int, str]]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The held layers (full-model indices, ascending) and per held layer its ``BLOCKS``
    string, for a chosen set of units; a layer with neither block kept is not held."""
    chosen: dict[int, set[str]] = {}
    for layer, block in units:
        if block not in UNITS or int(layer) != layer or layer < 0:
            raise ValueError(f"a unit is (layer >= 0, one of {UNITS}), got {(layer, block)}")
        chosen.setdefault(int(layer), set()).add(block)
    layers = tuple(sorted(chosen))
    return layers, tuple(_blocks_string("attn" in chosen[i], "mlp" in chosen[i]) for i in layers)


def blocks_to_units(layers: Sequence[int], blocks: Sequence[str]) -> list[tuple[int, str]]:
    """The units held by ``layers`` keeping ``blocks`` (``()``: every block), in layer order."""
    blocks = tuple(blocks) or ("attn+mlp",) * len(layers)
    if len(blocks) != len(layers) or not set(blocks) <= set(BLOCKS):
        raise ValueError(f"blocks must name one of {BLOCKS} per layer, got {blocks} for {layers}")
    return [(layer, block) for layer, keep in sorted(zip(layers, blocks, strict=True))
            for block in UNITS if block in keep.split("+")]
