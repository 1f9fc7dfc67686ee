"""NF4 quantization of a (sub-)LLM with bitsandbytes, as clients hold and run it (QLoRA).

The stored artifact keeps the linear projections in NF4 with double quantization and every
other tensor (embeddings, norms) in bf16. At run time the 4-bit matmuls compute in bf16, and
the leftovers stay in their stored bf16: transformers keeps a pre-quantized checkpoint's dtype
even where ``load_nf4`` asks for float32 on CPU. On a CPU without native bf16 matmuls the
matmuls compute in float32 instead (``cpu_matmul``: 20x faster there, same stored weights).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from fedsoda.surgery.cpu_matmul import use_fp32_matmuls


def nf4_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def keep_cpu_weights_trainable(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    With bitsandbytes 0.50.2 on a CPU with AVX512-BF16, the first no-grad eval forward
    repacks the weights into a layout whose kernel has no autograd; backward through them
    then silently yields no gradient for the LoRA tensors below. Turning the repack off
    keeps one model instance usable for both evaluation and training.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def save_nf4(model: nn.Module, folder: Path | str, tokenizer=None) -> Path:
    """Quantize a 16/32-bit causal LM to NF4 and save it (the file clients download)."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="fedsoda-nf4-") as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp, quantization_config=nf4_config(), dtype=torch.bfloat16, device_map="cpu")
        quantized.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_nf4(folder: Path | str, device: str = "cpu") -> nn.Module:
    """Load a saved NF4 model for training and inference on ``device``."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no saved NF4 model (no config.json)")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    return use_fp32_matmuls(keep_cpu_weights_trainable(model), device)


QUANTIZATIONS = ("nf4", "bf16")


def save_client_weights(model: nn.Module, folder: Path | str, quantization: str,
                        tokenizer=None) -> Path:
    """Store a client model as clients hold it: NF4 (FedSODA) or 16-bit (the baselines)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "nf4":
        return save_nf4(model, folder, tokenizer)
    folder = Path(folder)
    model.to(torch.bfloat16).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_client_weights(folder: Path | str, quantization: str, device: str = "cpu") -> nn.Module:
    """Load a stored client model; 16-bit models run in bf16 (LoRA tensors stay float32)."""
    if quantization == "nf4":
        return load_nf4(folder, device)
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no saved model (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device)
    return use_fp32_matmuls(model, device)


def quantize_nf4(model: nn.Module, device: str = "cpu") -> nn.Module:
    """NF4 copy of ``model`` in memory (save and load through a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="fedsoda-nf4-") as tmp:
        save_nf4(model, tmp)
        return load_nf4(tmp, device)


def storage_bytes(folder: Path | str) -> int:
    """Bytes of the weight files a client must store for a saved model folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """A model's unique parameters without LoRA tensors (those are stored apart, in float32).

    ``named_parameters()`` yields a tied parameter once, so a tied LM head is not counted
    twice; this also holds on the meta device, where every tensor has the same (null) address.
    """
    return [param for name, param in model.named_parameters() if "lora_" not in name]


def dense_bytes(model: nn.Module, bytes_per_param: int = 2) -> int:
    """Bytes of a model's unique weights at ``bytes_per_param`` (2 = bf16), LoRA not counted."""
    return sum(param.numel() * bytes_per_param for param in _weights(model))


def nf4_linear_bytes(out_features: int, in_features: int) -> int:
    """Bytes bitsandbytes stores for one NF4 weight with double quantization.

    Packed 4-bit codes (2 per byte); one uint8 absmax per block of 64 (quantized again);
    one float32 absmax per 256 blocks; the 256-entry nested and 16-entry NF4 code tables
    (float32); and the quant-state JSON (about 170 bytes: its float offset varies in length).
    """
    numel = out_features * in_features
    blocks = -(-numel // 64)
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
                        "shape": [out_features, in_features], "nested_blocksize": 256,
                        "nested_dtype": "float32", "nested_offset": 0.1234567890123456})
    return -(-numel // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + len(state)


def nf4_storage_bytes(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """What ``save_nf4`` writes for ``model``, from its structure alone (meta device works).

    Every linear projection but ``skip`` becomes NF4; every other parameter (embeddings,
    norms, biases, an untied LM head) stays bf16. LoRA tensors and safetensors headers are
    not counted.
    """
    quantized = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in skip:
            quantized[id(module.weight)] = nf4_linear_bytes(module.out_features, module.in_features)
    return sum(quantized.get(id(param), param.numel() * 2) for param in _weights(model))
