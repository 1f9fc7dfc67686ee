"""Family-independent access to the decoder layers of a causal LM.

Llama, Qwen2, Mistral and Gemma-3 (text) all keep their decoder stack at ``model.layers``
of the ``*ForCausalLM`` wrapper and their attention module at ``layer.self_attn``.
"""

from __future__ import annotations

from torch import nn

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral", "gemma3_text")

# Linear projections that receive LoRA (attention and MLP) in every supported family.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a PEFT-wrapped model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    inner = getattr(unwrap(model), "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(unwrap(model)).__name__} has no decoder stack at model.layers; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return layers


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def layer_output(output):
    """Hidden state returned by a decoder layer (a tensor, or a tuple led by it)."""
    return output[0] if isinstance(output, tuple) else output
