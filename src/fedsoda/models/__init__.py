"""Load causal LMs and reach their layers; never imports flwr."""

from fedsoda.models.layers import LORA_TARGETS, decoder_layers, layer_output, num_layers, unwrap
from fedsoda.models.loading import (
    BUILTIN_MODELS,
    ModelNotFoundError,
    cache_dir,
    load,
    load_config,
    local_folder,
    model_fingerprint,
)

__all__ = [
    "BUILTIN_MODELS",
    "LORA_TARGETS",
    "ModelNotFoundError",
    "cache_dir",
    "decoder_layers",
    "layer_output",
    "load",
    "load_config",
    "local_folder",
    "model_fingerprint",
    "num_layers",
    "unwrap",
]
