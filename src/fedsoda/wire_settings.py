"""How LoRA travels (``[wire]`` in a config): the settings and the bytes each format takes.
Plain Python, so reading a config loads no torch; the codec is ``fedsoda.wire``."""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("fp32", "bf16", "int8", "nf4")
FEEDBACK = ("both", "up", "down", "none")  # which streams carry their rounding residual
BLOCKS = tuple(2**k for k in range(5, 13))  # 32..4096: what bitsandbytes' 4-bit kernels take
NPY_HEADER = 128  # bytes numpy's .npy header takes for a float32 array of up to 4 dimensions


@dataclass(frozen=True)
class WireSettings:
    """How LoRA travels, both ways. ``[wire]`` in a config: ``format``, ``block`` (values per
    absmax block, int8 and nf4) and ``error_feedback`` (both, up, down or none)."""

    format: str = "fp32"
    block: int = 64
    error_feedback: str = "both"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"wire.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.block not in BLOCKS:
            raise ValueError(f"wire.block must be a power of two in 32..4096, got {self.block}")
        if self.error_feedback not in FEEDBACK:
            raise ValueError(f"wire.error_feedback must be one of {', '.join(FEEDBACK)}, "
                             f"got {self.error_feedback!r}")

    @property
    def quantized(self) -> bool:
        """Anything but fp32: updates travel, not states."""
        return self.format != "fp32"

    @property
    def feedback_up(self) -> bool:
        return self.quantized and self.error_feedback in ("both", "up")

    @property
    def feedback_down(self) -> bool:
        return self.quantized and self.error_feedback in ("both", "down")

    @property
    def label(self) -> str:
        """How a run's summary and the comparison name this setting: ``fp32``, ``nf4``,
        ``nf4 b4096``, ``int8 EF none``."""
        if not self.quantized:
            return "fp32"
        block = f" b{self.block}" if self.format in ("int8", "nf4") and self.block != 64 else ""
        feedback = "" if self.error_feedback == "both" else f" EF {self.error_feedback}"
        return self.format + block + feedback

    @property
    def tag(self) -> str:
        """Names the encoding in every array it writes (Flower's ``stype``), so a reply
        encoded otherwise is rejected, not misread."""
        blocked = self.format in ("int8", "nf4")
        return f"fedsoda.{self.format}" + (f".b{self.block}" if blocked else "")


def encoded_bytes(numel: int, fmt: str, block: int = 64) -> int:
    """Bytes one tensor of ``numel`` values takes on the wire (codes plus per-block absmax;
    fp32: the .npy buffer with its header)."""
    blocks = -(-numel // block)
    return {"fp32": NPY_HEADER + 4 * numel, "bf16": 2 * numel, "int8": numel + 4 * blocks,
            "nf4": (numel + 1) // 2 + 4 * blocks}[fmt]
