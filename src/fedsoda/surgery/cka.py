"""Linear CKA between decoder-layer outputs, and block influence (FedPruner's FDLO and IALS).

FedPruner (method notes, section 2.3) groups layers by the linear CKA between their output
hidden states and picks one layer per group by its importance, by default the block
influence ``1 - cos(layer input, layer output)`` (section 2.4). Both come from one forward
pass with hooks on the decoder layers (not HF's ``hidden_states``, whose last entry is taken
after the final norm).

Tokens: real (non-pad) tokens only, and by default not each sample's first token. On
SmolLM2-135M the first token carries a few massive activations (the attention sink) that make
CKA ~1.0 between nearly all layers above 10 and say nothing about what the layers do; without
it the matrix is graded and block-like (issue 15, ``bench/cka_matrix.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fedsoda.models import decoder_layers, layer_output


@dataclass(frozen=True)
class LayerProbe:
    """What one pass over the batches measured, per decoder layer.

    ``outputs[l]`` is a ``[T, d]`` float32 tensor of layer ``l``'s output at the chosen
    tokens (the same ``T`` rows, in the same order, for every layer); ``influence[l]`` is the
    block influence of layer ``l`` averaged over all chosen tokens (before any token cap);
    ``tokens`` is how many tokens were chosen before the cap.
    """

    outputs: list[torch.Tensor]
    influence: list[float]
    tokens: int


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` of ``[T, d]`` tensors.

    Columns are centred and the arithmetic is float64. The two tensors may differ in width but
    must have the same rows (the same tokens). A constant argument has no variance: an error.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs [T, d] tensors with the same T, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    xc, yc = _centred(x), _centred(y)
    denominator = _self_norm(xc) * _self_norm(yc)
    if denominator == 0:
        raise ValueError("linear_cka of a constant tensor (no variance) is undefined")
    return float(torch.linalg.matrix_norm(yc.T @ xc) ** 2 / denominator)


def cka_matrix(outputs: list[torch.Tensor]) -> torch.Tensor:
    """``[L, L]`` float64 matrix of linear CKA between every pair of layer outputs."""
    if not outputs:
        raise ValueError("cka_matrix needs at least one layer output")
    # Centred pair by pair in float64, not all at once: a centred copy of every output would
    # double what the probe holds, and its memory must fit a client's budget (on BoolQ's long
    # prompts FedPruner+'s 60 units made the probe twice the 25% budget).
    norms = [_self_norm(_centred(x)) for x in outputs]
    if any(norm == 0 for norm in norms):
        raise ValueError("a layer output is constant over the tokens; its CKA is undefined")
    count = len(outputs)
    matrix = torch.eye(count, dtype=torch.float64)
    for i in range(count):
        ci = _centred(outputs[i])
        for j in range(i + 1, count):
            cross = torch.linalg.matrix_norm(_centred(outputs[j]).T @ ci) ** 2
            matrix[i, j] = matrix[j, i] = cross / (norms[i] * norms[j])
    return matrix


@torch.no_grad()
def probe_layers(model: nn.Module, batches: Iterable[dict], skip_first: bool = True,
                 max_tokens: int | None = 2048, seed: int = 0) -> LayerProbe:
    """Layer outputs and block influence of every decoder layer, in one pass over ``batches``.

    ``batches`` yield ``input_ids`` and ``attention_mask`` (left or right padding). With
    ``max_tokens`` the outputs keep a subsample of that many tokens, the same for every
    layer, drawn with a seeded generator so the result does not depend on the global RNG.
    """
    layers = decoder_layers(model)
    outputs: list[list[torch.Tensor]] = [[] for _ in layers]
    influence_sums = torch.zeros(len(layers), dtype=torch.float64)
    chosen: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(_module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            keep = chosen["mask"]
            before, after = inputs[keep].double(), layer_output(output)[keep].double()
            cosine = nn.functional.cosine_similarity(before, after, dim=-1, eps=1e-12)
            influence_sums[index] += (1.0 - cosine).sum()
            outputs[index].append(after.float())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            chosen["mask"] = token_mask(batch["attention_mask"], skip_first)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    stacked = [torch.cat(rows) for rows in outputs]
    tokens = stacked[0].shape[0] if stacked else 0
    if tokens == 0:
        raise ValueError("no tokens to measure: every sample is padding (or one token long "
                         "with skip_first)")
    rows = capped_rows(tokens, max_tokens, seed)
    if rows is not None:
        stacked = [x[rows] for x in stacked]
    return LayerProbe(outputs=stacked, influence=(influence_sums / tokens).tolist(),
                      tokens=tokens)


def capped_rows(tokens: int, max_tokens: int | None, seed: int) -> torch.Tensor | None:
    """The token cap: ``max_tokens`` of ``tokens`` rows (sorted), from a seeded generator so
    the draw does not depend on the global RNG; ``None`` when there is no cap to apply. Drawn
    from the count alone, so a probe can draw them before its pass (``surgery.streamed``)."""
    if max_tokens is None or tokens <= max_tokens:
        return None
    rows = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:max_tokens]
    return rows.sort().values


def layer_outputs(model: nn.Module, batches: Iterable[dict], skip_first: bool = True,
                  max_tokens: int | None = 2048, seed: int = 0) -> list[torch.Tensor]:
    """Per decoder layer, its ``[T, d]`` float32 output at the chosen tokens."""
    return probe_layers(model, batches, skip_first, max_tokens, seed).outputs


def block_influence(model: nn.Module, batches: Iterable[dict],
                    skip_first: bool = True) -> list[float]:
    """Per decoder layer, ``1 - cos(layer input, layer output)`` averaged over chosen tokens."""
    return probe_layers(model, batches, skip_first, max_tokens=None).influence


def token_mask(attention_mask: torch.Tensor, skip_first: bool = True) -> torch.Tensor:
    """``[B, T]`` bool: real tokens, without each sample's first real token if ``skip_first``."""
    real = attention_mask.bool()
    if skip_first:
        # The first real token is where the running count of real tokens reaches 1.
        real = real & (real.long().cumsum(dim=1) > 1)
    return real


def _centred(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def _self_norm(xc: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(xc.T @ xc)
