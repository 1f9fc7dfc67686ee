"""Run a layered model one decoder layer at a time, so that a client whose memory holds only
a few layers can still probe the whole model (FedPruner's per-round similarity).

One single-layer causal LM is built from the layered files (``fedsoda.surgery.layered``); for
each full-model layer in turn its weights (and its LoRA) are loaded into that one layer, the
batch's hidden states go through it, and the next layer replaces it. At no time is more than
one decoder layer (plus the embeddings) in memory. The layer's output equals what the whole
model computes there: the attention mask and rotary positions are made from the same
sequence, and nothing else crosses layers but the hidden state.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fedsoda.models import decoder_layers, unwrap
from fedsoda.surgery.cka import LayerProbe, token_mask
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


def streamed_probe(folder: Path | str, num_layers: int, batches: Iterable[dict],
                   lora: dict[str, torch.Tensor] | None = None, spec: LoraSpec = LoraSpec(),
                   paths: dict[str, Path] | None = None, skip_first: bool = True,
                   max_tokens: int | None = 2048, seed: int = 0) -> LayerProbe:
    """Every layer's output at the chosen tokens and its block influence (as
    ``fedsoda.surgery.cka.probe_layers`` reports them for a whole model), holding one layer.

    ``lora`` holds full-model-named LoRA tensors for any layers (the global LoRA); a layer
    without any runs without LoRA.
    """
    folder = Path(folder)
    where = lambda name: Path(paths[name]) if paths and name in paths else folder / name  # noqa: E731
    model = attach_lora(load_layered(folder, [0], paths, dtype=torch.float32), [0], spec)
    base = unwrap(model).model
    batches = list(batches)
    masks = [token_mask(b["attention_mask"], skip_first) for b in batches]
    with torch.no_grad():
        hidden = [base.embed_tokens(b["input_ids"]) for b in batches]
        outputs, influence, tokens = [], [], sum(int(m.sum()) for m in masks)
        if tokens == 0:
            raise ValueError("no tokens to measure: every sample is padding (or one token long "
                             "with skip_first)")
        norm, base.norm = base.norm, nn.Identity()  # the layer's raw output, not normed
        try:
            for index in range(num_layers):
                _load_layer(model, where(layer_file(index)))
                _load_layer_lora(model, lora or {}, index)
                out = [base(inputs_embeds=h, attention_mask=b["attention_mask"],
                            use_cache=False).last_hidden_state for h, b in zip(hidden, batches, strict=True)]
                before = torch.cat([h[m].double() for h, m in zip(hidden, masks, strict=True)])
                after = torch.cat([o[m].double() for o, m in zip(out, masks, strict=True)])
                influence.append(float((1.0 - nn.functional.cosine_similarity(
                    before, after, dim=-1, eps=1e-12)).sum() / tokens))
                outputs.append(after.float())
                hidden = out
        finally:
            base.norm = norm
    if max_tokens is not None and tokens > max_tokens:
        rows = torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:max_tokens]
        outputs = [x[rows.sort().values] for x in outputs]
    return LayerProbe(outputs=outputs, influence=influence, tokens=tokens)


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
