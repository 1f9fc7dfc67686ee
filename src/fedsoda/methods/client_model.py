"""Plan, then build the client model a recipe prescribes: one path for a run's server,
`fedsoda bench` and the planner (`fedsoda plan`, on the meta device)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fedsoda.methods.recipe import Recipe
from fedsoda.surgery.build import SubLLM, make_sub_llm, sketch_sub_llm
from fedsoda.surgery.lora import LoraSpec
from fedsoda.surgery.plan import PruneSettings, PruningPlan, uniform_plan, unpruned_plan
from fedsoda.surgery.sgp import sgp_plan


def layout_plan(recipe: Recipe, model_spec: str, num_layers: int,
                settings: PruneSettings) -> PruningPlan:
    """The recipe's layer layout from the layer count alone: no pruning, or ``p`` windows of
    ``n`` layers spread evenly over the emulator (FedOT, FedBiOT; for SGP, where its windows
    would go before similarity is measured). Raises ``ValueError`` for settings the model
    cannot take, so it also checks a run before any weights load."""
    if recipe.pruning == "none":
        return unpruned_plan(model_spec, num_layers)
    first, last = recipe.adapter_split(settings.adapter_layers)
    settings.check_model(num_layers)
    return uniform_plan(model_spec, num_layers, last, settings.n, settings.p, first)


def recipe_plan(recipe: Recipe, model_spec: str, full: nn.Module, tokenizer,
                settings: PruneSettings, data_dir: str | None,
                measure_similarity: bool = True) -> PruningPlan:
    """The recipe's pruning plan for ``full``: SGP (measured on public data, cached), uniform
    dropping of the same ``n`` and ``p``, or none.

    ``measure_similarity=False`` keeps SGP's windows where ``layout_plan`` puts them: a model
    on the meta device cannot run, and which windows go changes no size.
    """
    layout = layout_plan(recipe, model_spec, full.config.num_hidden_layers, settings)
    if recipe.pruning == "sgp" and measure_similarity:
        return sgp_plan(model_spec, settings, data_dir, loaded=(full, tokenizer))
    return layout


def build_client_model(recipe: Recipe, model_spec: str, full: nn.Module, tokenizer,
                       settings: PruneSettings, data_dir: str | None, folder: Path | None,
                       seed: int = 0, measure_similarity: bool = True,
                       spec: LoraSpec = LoraSpec()) -> SubLLM:
    """Plan, then build the client model with its emulator and adapter LoRA.

    With a ``folder`` the model is stored as clients hold it (``folder/model``, NF4 or bf16)
    and reloaded; with ``None`` it is only pruned in memory, not quantized or stored (the
    planner reads sizes off its structure, on the meta device).
    """
    plan = recipe_plan(recipe, model_spec, full, tokenizer, settings, data_dir,
                       measure_similarity)
    if folder is None:
        return sketch_sub_llm(full, plan, spec, seed=seed, quantization=recipe.quantization,
                              emulator_lora=recipe.emulator_lora)
    return make_sub_llm(full, plan, folder, tokenizer, spec, seed=seed,
                        quantization=recipe.quantization, emulator_lora=recipe.emulator_lora)
