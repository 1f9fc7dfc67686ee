"""Physically remove decoder layers so that the smaller model runs, caches and generates.

Removing a layer is more than dropping a module: each kept attention module's ``layer_idx``
indexes the KV cache, ``config.num_hidden_layers`` sizes the cache, and per-layer config
lists (Gemma-3's ``layer_types``) are read by position in the forward pass.
"""

from __future__ import annotations

import copy

from torch import nn

from fedsoda.models import decoder_layers, unwrap


def prune_config(config, kept: list[int]) -> None:
    total = config.num_hidden_layers
    for name, value in list(vars(config).items()):
        # Any per-layer list (layer_types, per-layer window settings) is pruned alike.
        if isinstance(value, list) and len(value) == total and name != "architectures":
            setattr(config, name, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    if hasattr(config, "max_window_layers") and config.max_window_layers is not None:
        # Qwen2: the first max_window_layers layers use full attention.
        config.max_window_layers = sum(1 for i in kept if i < config.max_window_layers)


def keep_layers(model: nn.Module, kept: list[int], share: bool = False) -> nn.Module:
    """A causal LM made of the given decoder layers of ``model``, in the given order.

    ``share=False`` deep-copies the model first (the sub-LLM is then independent).
    ``share=True`` builds a light view whose modules are the original ones (used to run
    part of a frozen teacher); it must not be used with a KV cache, because the shared
    attention modules keep their original ``layer_idx``.
    """
    base = unwrap(model)
    if sorted(set(kept)) != sorted(kept) or not kept:
        raise ValueError(f"kept layers must be distinct and non-empty, got {kept}")
    layers = decoder_layers(base)
    if max(kept) >= len(layers) or min(kept) < 0:
        raise ValueError(f"kept layers {kept} out of range for {len(layers)} layers")
    if share:
        view = copy.copy(base)
        view._modules = dict(base._modules)
        inner = copy.copy(base.model)
        inner._modules = dict(base.model._modules)
        inner.config = copy.deepcopy(base.model.config)
        inner.layers = nn.ModuleList([layers[i] for i in kept])
        prune_config(inner.config, kept)
        view.model = inner
        view.config = inner.config
        return view
    sub = copy.deepcopy(base)
    sub_layers = decoder_layers(sub)
    sub.model.layers = nn.ModuleList([sub_layers[i] for i in kept])
    prune_config(sub.config, kept)
    if sub.model.config is not sub.config:
        prune_config(sub.model.config, kept)
    for position, layer in enumerate(sub.model.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    return sub


def build_sub_llm(model: nn.Module, kept_layers: list[int]) -> nn.Module:
    """The sub-LLM of a pruning plan: an independent copy with only ``kept_layers``."""
    return keep_layers(model, kept_layers, share=False)
