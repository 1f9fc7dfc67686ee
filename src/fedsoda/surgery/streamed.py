"""Run a layered model one decoder layer at a time, so that a client whose memory holds only
a few layers can still probe the whole model (FedPruner's per-round similarity).

One single-layer causal LM is built from the layered files (``fedsoda.surgery.layered``); for
each full-model layer in turn its weights (and its LoRA) are loaded into that one layer, the
batch's hidden states go through it, and the next layer replaces it. At no time is more than
one decoder layer in memory (and the embedding matrix only while the inputs are embedded).
The layer's output equals what the whole model computes there: the attention mask and
rotary positions are made from the same sequence, and nothing else crosses layers but the
hidden state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fedsoda.models import decoder_layers, unwrap
from fedsoda.surgery.blocks import blocks_dropped
from fedsoda.surgery.cka import LayerProbe, capped_rows, token_mask
from fedsoda.surgery.layered import layer_file, load_layered
from fedsoda.surgery.lora import LoraSpec, attach_lora, load_lora_state, to_local


def _load_layer(model: nn.Module, path: Path) -> None:
    """Put one full-model layer's weights (a layer file) into the model's only layer."""
    layer = decoder_layers(model)[0]
    state = {_wrapped_name(layer, key): tensor for key, tensor in load_file(str(path)).items()}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if unexpected or any("lora_" not in k for k in missing):
        raise ValueError(f"{path.name} does not fit the model's layer: unexpected {unexpected[:3]}")


def _wrapped_name(layer: nn.Module, key: str) -> str:
    # PEFT wraps a LoRA target as module.base_layer; the layer file names the plain module.
    module, _, param = key.rpartition(".")
    return f"{module}.base_layer.{param}" if hasattr(layer.get_submodule(module), "base_layer") else key


@dataclass(frozen=True)
class UnitProbe:
    """FedPruner+'s units (method notes 2.7), per layer at the same chosen tokens as the
    ``LayerProbe``: the residual stream right after the attention block (``h + attn(norm(h))``)
    and right after the MLP block (the layer's output), and each block's influence, 1 - cos
    of that block's input and output stream."""

    attn_outputs: list[torch.Tensor]
    mlp_outputs: list[torch.Tensor]
    attn_influence: list[float]
    mlp_influence: list[float]


def streamed_probe(folder: Path | str, num_layers: int, batches: Iterable[dict],
                   lora: dict[str, torch.Tensor] | None = None, spec: LoraSpec = LoraSpec(),
                   paths: dict[str, Path] | None = None, skip_first: bool = True,
                   max_tokens: int | None = 2048, seed: int = 0, units: bool = False,
                   dtype: torch.dtype = torch.float32):
    """Every layer's output at the chosen tokens and its block influence (as
    ``fedsoda.surgery.cka.probe_layers`` reports them for a whole model), holding one layer;
    with ``units``, ``(LayerProbe, UnitProbe)``: each layer is also run with its MLP dropped
    (the same modules, put back after), which gives the stream after its attention block.

    ``lora`` holds full-model-named LoRA tensors for any layers (the global LoRA); a layer
    without any runs without LoRA. The kept rows are stored in ``dtype`` (bfloat16 halves
    what the probe holds; CKA upcasts them to float64).
    """
    folder = Path(folder)
    where = lambda name: Path(paths[name]) if paths and name in paths else folder / name  # noqa: E731
    batches = list(batches)
    model, embedded = _one_layer_model(folder, paths, batches, spec)
    base = unwrap(model).model
    masks = [token_mask(b["attention_mask"], skip_first) for b in batches]
    tokens = sum(int(m.sum()) for m in masks)
    if tokens == 0:
        raise ValueError("no tokens to measure: every sample is padding (or one token long "
                         "with skip_first)")
    run = lambda hidden: [base(inputs_embeds=h, attention_mask=b["attention_mask"],  # noqa: E731
                               use_cache=False).last_hidden_state
                          for h, b in zip(hidden, batches, strict=True)]
    picked = lambda hidden: torch.cat([h[m].double() for h, m in zip(hidden, masks, strict=True)])  # noqa: E731
    # The token cap's rows, drawn before the pass (probe_layers draws the same ones after it):
    # each layer keeps only those, so what the probe holds does not grow with the prompts.
    rows = capped_rows(tokens, max_tokens, seed)
    kept = lambda x: (x if rows is None else x[rows]).to(dtype)  # noqa: E731
    found = {"out": [], "inf": [], "attn": [], "attn_inf": [], "mlp_inf": []}
    with torch.no_grad():
        hidden = embedded
        norm, base.norm = base.norm, nn.Identity()  # the layer's raw output, not normed
        try:
            for index in range(num_layers):
                _load_layer(model, where(layer_file(index)))
                _load_layer_lora(model, lora or {}, index)
                out = run(hidden)
                before, after = picked(hidden), picked(out)
                found["inf"].append(_influence(before, after, tokens))
                found["out"].append(kept(after))
                if units:
                    with blocks_dropped(model, ("attn",)):
                        middle = picked(run(hidden))
                    found["attn"].append(kept(middle))
                    found["attn_inf"].append(_influence(before, middle, tokens))
                    found["mlp_inf"].append(_influence(middle, after, tokens))
                hidden = out
        finally:
            base.norm = norm
    outputs, attn = found["out"], found["attn"]
    layer_probe = LayerProbe(outputs=outputs, influence=found["inf"], tokens=tokens)
    if not units:
        return layer_probe
    return layer_probe, UnitProbe(attn_outputs=attn, mlp_outputs=outputs,
                                  attn_influence=found["attn_inf"], mlp_influence=found["mlp_inf"])


def _one_layer_model(folder: Path, paths, batches: list[dict], spec: LoraSpec):
    """The single-layer model in fp32 with LoRA, and the batches' embeddings, without the
    vocabulary: the embedding is read as stored (bf16), used once, and dropped with the LM
    head tied to it, the largest tensors of a small model (SmolLM2's are 113 MB in fp32)."""
    lm = load_layered(folder, [0], paths)
    with torch.no_grad():
        embedded = [lm.model.embed_tokens(b["input_ids"]).float() for b in batches]
    lm.model.embed_tokens, lm.lm_head = nn.Identity(), nn.Identity()
    return attach_lora(lm.float(), [0], spec), embedded


def _influence(before: torch.Tensor, after: torch.Tensor, tokens: int) -> float:
    return float((1.0 - nn.functional.cosine_similarity(before, after, dim=-1, eps=1e-12)).sum()
                 / tokens)


def _load_layer_lora(model: nn.Module, lora: dict[str, torch.Tensor], index: int) -> None:
    """The LoRA of full-model layer ``index`` into the single layer; zero B where it has none
    (B = 0 makes LoRA a no-op)."""
    mine = {k: v for k, v in lora.items() if f".layers.{index}." in k}
    if mine:
        load_lora_state(model, to_local(mine, [index]))
        return
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.data.zero_()
