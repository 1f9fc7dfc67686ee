"""LoRA on the wire in 32, 16, 8 or 4 bits: the codec and its error feedback. Plain functions
over tensor dicts, no runtime (``fedsoda.federated.messages`` puts the bytes into Flower
records).

Formats (``[wire] format``), per tensor, its values flattened in row-major order:
- ``fp32``: the float32 array, as every run sent it before this setting existed (a numpy
  ``.npy`` buffer); the three below are fedsoda's own buffers.
- ``bf16``: round-to-nearest-even bfloat16, 2 bytes a value.
- ``int8``: blockwise absmax: each block of ``block`` values is divided by its largest
  magnitude and rounded to the nearest of the 255 levels k/127, k = -127..127 (symmetric
  int8: bitsandbytes' ``quantize_blockwise`` with its linear map); 1 byte a value plus one
  float32 absmax per block.
- ``nf4``: the same blocks, rounded to the 16 NormalFloat levels of QLoRA
  (bitsandbytes' ``quantize_4bit``); half a byte a value plus one float32 absmax per block.

A quantized format sends *updates*, not states: a client sends its trained LoRA minus the
LoRA it started from, the server adds it to the exact LoRA it sent (so the server's state
never absorbs a rounding error), and the server sends the global LoRA itself, which the
client decodes and starts from. Error feedback (``[wire] error_feedback``) carries each
rounding residual into the next message of the same stream: a client adds the residual of
its last upload to its next update, the server the residual of its last broadcast to the
next. So the running sum of what is sent tracks the running sum of what should have been
sent within one rounding error, instead of drifting by one per round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import bitsandbytes.functional as bnbf
import numpy as np
import torch

from fedsoda.wire_settings import FEEDBACK, FORMATS, WireSettings, encoded_bytes

__all__ = ["FEEDBACK", "FORMATS", "Encoded", "WireError", "WireSettings", "decode_tensor",
           "encode", "encode_tensor", "encoded_bytes"]


class WireError(ValueError):
    """Encoded bytes that cannot be what the codec wrote (one line: what is wrong)."""


@lru_cache(maxsize=1)
def _linear_code() -> torch.Tensor:
    return bnbf.create_linear_map(signed=True, total_bits=8)


@lru_cache(maxsize=1)
def _nf4_code() -> torch.Tensor:
    return bnbf.get_4bit_type("nf4", device="cpu")


def encode_tensor(tensor: torch.Tensor, fmt: str, block: int) -> bytes:
    """One tensor's bytes in a quantized format (``bf16``, ``int8``, ``nf4``)."""
    flat = tensor.detach().reshape(-1).float().contiguous()
    if fmt == "bf16":
        return flat.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    if fmt == "int8":
        codes, state = bnbf.quantize_blockwise(flat, code=_linear_code(), blocksize=block)
    elif fmt == "nf4":
        codes, state = bnbf.quantize_4bit(flat, blocksize=block, quant_type="nf4")
    else:
        raise ValueError(f"no quantized wire format {fmt!r}")
    return codes.numpy().tobytes() + state.absmax.float().numpy().tobytes()


def decode_tensor(data: bytes, shape: tuple[int, ...], fmt: str, block: int) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``data`` encodes; a WireError if it cannot."""
    numel = int(np.prod(shape)) if shape else 1
    if len(data) != encoded_bytes(numel, fmt, block):
        raise WireError(f"{len(data)} bytes cannot hold {numel} values in {fmt} (block {block}); "
                        f"expected {encoded_bytes(numel, fmt, block)}")
    if fmt == "bf16":
        raw = torch.frombuffer(bytearray(data), dtype=torch.int16)
        return raw.view(torch.bfloat16).float().reshape(shape)
    blocks = -(-numel // block)
    absmax = torch.frombuffer(bytearray(data[-4 * blocks:]), dtype=torch.float32)
    if not torch.isfinite(absmax).all() or (absmax < 0).any():
        raise WireError(f"{fmt} block scales must be finite and >= 0")
    codes = torch.frombuffer(bytearray(data[:-4 * blocks]), dtype=torch.uint8)
    if fmt == "int8":
        flat = bnbf.dequantize_blockwise(codes, absmax=absmax, code=_linear_code(), blocksize=block)
    else:
        state = bnbf.QuantState(absmax=absmax, shape=torch.Size([numel]), dtype=torch.float32,
                                blocksize=block, quant_type="nf4", code=_nf4_code())
        flat = bnbf.dequantize_4bit(codes.reshape(-1, 1), state)
    return flat.float().reshape(shape)


@dataclass(frozen=True)
class Encoded:
    """What a stream sends this time: every tensor's bytes and shape, the values the other
    side will decode (``view``), and the residual to carry into the stream's next message."""

    data: dict[str, bytes]
    shapes: dict[str, tuple[int, ...]]
    view: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]


def encode(tensors: dict[str, torch.Tensor], settings: WireSettings,
           residual: dict[str, torch.Tensor] | None = None) -> Encoded:
    """Encode ``tensors`` plus the stream's ``residual`` (keys it lacks count as zero; keys
    not in ``tensors`` are carried over unchanged). ``residual=None``: no error feedback."""
    carried = dict(residual or {})
    data, shapes, view = {}, {}, {}
    for key, tensor in tensors.items():
        value = tensor.float() + carried[key] if key in carried else tensor.float()
        data[key] = encode_tensor(value, settings.format, settings.block)
        shapes[key] = tuple(tensor.shape)
        view[key] = decode_tensor(data[key], shapes[key], settings.format, settings.block)
        if residual is not None:
            carried[key] = value - view[key]
    return Encoded(data=data, shapes=shapes, view=view, residual=carried if residual is not None else {})
