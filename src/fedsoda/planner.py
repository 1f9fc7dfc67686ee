"""Table 2 figures for paper-scale models, from their config alone (meta device, no weights).

Each method's client model is built exactly as a run builds it (the recipe's plan, the same
layer surgery, the same LoRA), only on the meta device; the figures are then read off it
with the functions the runtime uses: LoRA tensors per layer set, NF4 or bf16 storage.

Similarity group pruning decides *which* windows go, not how many, and every decoder layer
of these models has the same size, so the planner lays the windows out uniformly for SGP.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from fedsoda.federated.config import RunConfig
from fedsoda.methods import RECIPES
from fedsoda.methods.client_model import build_client_model
from fedsoda.methods.recipe import Recipe
from fedsoda.surgery.lora import LoraSpec, lora_numel, lora_sizes
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.quantize import dense_bytes, nf4_storage_bytes
from fedsoda.wire import FORMATS, encoded_bytes

PAPER_MODELS = ("llama3-8b", "qwen2-7b", "mistral-7b")
RUN = RunConfig()
# FedSODA's communication per round on BoolQ at n=3, p=4, r=5 (MB/round: Table 4 for
# LLaMA3-8B, Tables 7 and 8 for Qwen2-7B and Mistral-7B).
PAPER_MB_PER_ROUND = {"llama3-8b": 1.43, "qwen2-7b": 1.57, "mistral-7b": 1.43}


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """A shipped config (``llama3-8b``, ``qwen2-7b``, ``mistral-7b``) or a config.json path."""
    if name_or_path in PAPER_MODELS:
        text = resources.files("fedsoda.model_configs").joinpath(f"{name_or_path}.json").read_text()
    else:
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model config {name_or_path!r}: use one of "
                                    f"{', '.join(PAPER_MODELS)} or a path to a config.json")
        text = path.read_text()
    facts = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
    if "model_type" not in facts:
        raise ValueError(f"{name_or_path}: a model config needs a model_type")
    return AutoConfig.for_model(**facts)


def saved_activation_bytes(config: PretrainedConfig, batch: int, seq: int, layers: int) -> int:
    """bf16 activations the backward pass keeps for ``layers`` decoder layers (an estimate).

    Per token and layer: the inputs of the two norms and of the q/k/v, o, gate/up and down
    projections, q/k/v themselves, and the gate, up and activation outputs; attention runs
    as fused SDPA, so no S x S score matrix is kept.
    """
    hidden, inner = config.hidden_size, config.intermediate_size
    kv = hidden // config.num_attention_heads * config.num_key_value_heads
    per_token = 6 * hidden + 2 * kv + 4 * inner
    return 2 * batch * seq * layers * per_token


def _wire_bytes(sizes: list[int], fmt: str, block: int) -> int:
    """Bytes of LoRA tensors of ``sizes`` values in wire format ``fmt``."""
    return sum(encoded_bytes(numel, fmt, block) for numel in sizes)


def method_figures(recipe: Recipe, config: PretrainedConfig, settings: PruneSettings,
                   spec: LoraSpec, realign_every: int, batch: int, seq: int,
                   block: int = 64) -> dict:
    """One method's per-client figures for the model of ``config``; bytes on the wire per
    round in every wire format (``block`` values per absmax block)."""
    with torch.device("meta"):
        full: nn.Module = AutoModelForCausalLM.from_config(config)
    sub = build_client_model(recipe, "planner", full, None, settings, None, folder=None,
                             measure_similarity=False, spec=spec)
    plan, model = sub.plan, sub.model
    weights = nf4_storage_bytes(model) if recipe.quantization == "nf4" else dense_bytes(model, 2)
    adapter = lora_numel(model, sub.adapter_layers)
    emulator = lora_numel(model, sub.emulator_layers)
    comm = int(recipe.comm_per_round(adapter, emulator, realign_every))
    adapter_sizes = lora_sizes(model, sub.adapter_layers)
    emulator_sizes = lora_sizes(model, sub.emulator_layers)
    wire = {fmt: int(recipe.comm_per_round(_wire_bytes(adapter_sizes, fmt, block),
                                           _wire_bytes(emulator_sizes, fmt, block), realign_every))
            for fmt in FORMATS}
    lora_bytes = 4 * (adapter + emulator)  # LoRA tensors are held and sent in float32
    # Backward runs from the lowest trainable layer up; below it, no graph is kept.
    graph_layers = plan.sub_num_layers - min(plan.sub_adapter_layers)
    step_memory = (weights + lora_bytes + 3 * 4 * adapter  # gradient + two AdamW moments
                   + saved_activation_bytes(config, batch, seq, graph_layers))
    return {"trainable_params": adapter, "comm_params_per_round": comm,
            "comm_bytes_per_round": wire,
            "client_model_bytes": weights + lora_bytes, "step_memory_bytes": step_memory,
            "emulator_lora_params": emulator, "kept_layers": plan.sub_num_layers,
            "adapter_layers": plan.full_adapter_layers, "quantization": recipe.quantization,
            "realign_every": recipe.realign_every(realign_every)}


def plan_methods(model_config: str, settings: PruneSettings = PruneSettings(),
                 spec: LoraSpec = LoraSpec(), realign_every: int = RUN.realign_every,
                 batch: int = RUN.batch_size, seq: int = RUN.max_tokens,
                 block: int = RUN.wire.block) -> dict:
    """Every method's figures for one model: the JSON ``fedsoda plan`` writes. The step and
    the schedule default to a run's (``RunConfig``)."""
    config = load_model_config(model_config)
    return {"model": model_config, "num_layers": config.num_hidden_layers,
            "assumptions": {"n": settings.n, "p": settings.p,
                            "adapter_layers": settings.adapter_layers, "lora_r": spec.r,
                            "lora_targets": list(spec.targets), "realign_every": realign_every,
                            "wire_block": block,
                            "batch_size": batch, "seq_len": seq,
                            "comm": "per client and round, download plus upload, in parameters; "
                                    "emulator LoRA amortized over the realignment period; "
                                    "comm_bytes_per_round: the same in bytes, per wire format"},
            "paper_mb_per_round": PAPER_MB_PER_ROUND.get(model_config),
            "methods": {name: method_figures(recipe, config, settings, spec, realign_every,
                                             batch, seq, block)
                        for name, recipe in RECIPES.items()}}
