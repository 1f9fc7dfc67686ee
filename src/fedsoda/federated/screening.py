"""Screen every client reply before aggregation: a bad reply is rejected, never averaged in."""

from __future__ import annotations

import math

import torch


def screen_update(update: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                  num_examples: float, max_examples: int) -> str | None:
    """Why the update must be rejected, or None if it is sound.

    Checks: exactly the expected keys, each with the expected shape and a float32 dtype,
    only finite values, and an example count that is a whole number in ``1..max_examples``
    (a client that inflates its count would otherwise dominate FedAvg).
    """
    missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
    if missing or extra:
        return f"keys differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for key, reference in expected.items():
        tensor = update[key]
        if tuple(tensor.shape) != tuple(reference.shape):
            return f"{key}: shape {tuple(tensor.shape)} != {tuple(reference.shape)}"
        if tensor.dtype != torch.float32:
            return f"{key}: dtype {tensor.dtype} != torch.float32"
        if not torch.isfinite(tensor).all():
            return f"{key}: non-finite values"
    if not isinstance(num_examples, (int, float)) or not math.isfinite(num_examples):
        return f"example count {num_examples!r} is not a number"
    if num_examples != int(num_examples) or not 1 <= num_examples <= max_examples:
        return f"example count {num_examples} outside 1..{max_examples} (the partition size)"
    return None
