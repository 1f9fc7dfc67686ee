"""The server's models for any method: the full LLM (teacher, holding the global adapter LoRA)
and the client model the recipe prescribes, plus the alignment it runs."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedsoda.align import oda
from fedsoda.align.gradmatch import match_gradients, match_steps
from fedsoda.align.oda import (
    AlignSettings,
    TeacherCache,
    public_caches,
    task_caches,
)
from fedsoda.data.partition import reserved_rows
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.tasks import evaluate, fit_cut
from fedsoda.fidelity import gradient_fidelity, option_token_ids
from fedsoda.methods.client_model import build_client_model, recipe_plan
from fedsoda.methods.recipe import Recipe
from fedsoda.models import load
from fedsoda.phases import phase
from fedsoda.surgery.build import SubLLM, open_sub_llm, save_sub_llm
from fedsoda.surgery.lora import load_lora_state, to_local
from fedsoda.surgery.plan import PruneSettings, PruningPlan
from fedsoda.surgery.plugback import export_peft, plug_adapter
from fedsoda.surgery.quantize import dense_bytes


@dataclass
class ServerModels:
    """The full LLM (teacher, holding the global adapter LoRA) and the client model."""

    recipe: Recipe
    teacher: nn.Module
    sub: SubLLM
    tokenizer: object
    folder: Path  # the client model folder clients download (``folder/model``)
    public: TeacherCache | None  # public batches with cached teacher activations
    heldout: TeacherCache | None
    sizes: dict  # storage bytes of what a client holds
    full_bf16_bytes: int
    # The training rows no client holds, on which the server fits the full LLM's option
    # threshold at each evaluation (``align.calibrate``); None when it does not.
    cut_rows: list[dict] | None = None


def make_plan(recipe: Recipe, model_spec: str, full: nn.Module, tokenizer,
              settings: PruneSettings, data_dir: str | None, out: Path) -> PruningPlan:
    """The recipe's plan (SGP cached, uniform dropping of the same n and p, or none), saved."""
    plan = recipe_plan(recipe, model_spec, full, tokenizer, settings, data_dir)
    plan.save(out)
    return plan


def prepare(recipe: Recipe, model_spec: str, prune_settings: PruneSettings,
            settings: AlignSettings, data_dir: str | None, out: Path,
            task_name: str, pre_align: bool = True) -> ServerModels:
    """Plan, build the client model with LoRA, cache the teacher, pre-align (if the recipe
    does) and match gradients (if the settings say so).

    If ``out/subllm`` already holds a built client model (a resumed run), it is reopened
    instead of rebuilt, and no pre-alignment runs again. With ``settings.data = "task"`` the
    server aligns on the ``task_name`` training rows no client holds.
    """
    folder = out / "subllm"
    # Read before any weights load: a server without the task's training split stops here.
    rows = reserved_rows(task_name, settings.reserved, data_dir) \
        if (recipe.aligns or settings.calibrate) and settings.data == "task" else None
    full, tokenizer = load(model_spec)
    if (folder / "lora.json").exists():
        sub, pre_align = open_sub_llm(folder), False
    else:
        sub = build_client_model(recipe, model_spec, full, tokenizer, prune_settings, data_dir,
                                 folder, seed=settings.seed)
        sub.plan.save(out / "plan.json")
    full_bf16_bytes = dense_bytes(full, 2)
    teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), sub.plan)
    del full
    public = heldout = None
    if rows is not None and recipe.aligns:
        task = get_task(task_name)
        options = tuple(option_token_ids(tokenizer, task.options) or ()) \
            if task.is_classification else ()
        public, heldout = task_caches(teacher, sub.plan, tokenizer, task, rows, settings, options)
    elif recipe.aligns:
        public, heldout = public_caches(teacher, sub.plan, tokenizer, settings, data_dir)
    models = ServerModels(recipe=recipe, teacher=teacher, sub=sub, tokenizer=tokenizer,
                          folder=folder, public=public, heldout=heldout, sizes={},
                          full_bf16_bytes=full_bf16_bytes,
                          cut_rows=rows if settings.calibrate else None)
    if pre_align and recipe.pre_align:
        report = oda.pre_align(teacher, sub.model, sub.plan, public, heldout, settings,
                               lora_layers=sub.emulator_layers)
        if settings.match_epochs:
            report["gradmatch"] = match(models, settings)
        (out / "align.json").write_text(json.dumps(report, indent=2) + "\n")
    models.sizes.update(save_sub_llm(sub, folder))
    return models


def set_global_adapter(models: ServerModels, adapter: dict[str, torch.Tensor]) -> None:
    """The same global adapter LoRA (full-model names) in the client model (student) and the
    full LLM (teacher)."""
    load_lora_state(models.sub.model, to_local(adapter, models.sub.plan.kept_layers))
    load_lora_state(models.teacher, adapter)


def realign(models: ServerModels, settings: AlignSettings, round_number: int) -> dict:
    """Realignment: ``E_r`` epochs on a random public subset; returns the emulator LoRA."""
    models.public, result = oda.realign(models.teacher, models.sub.model, models.sub.plan,
                                        models.public, settings, round_number,
                                        lora_layers=models.sub.emulator_layers)
    matched = match(models, settings) if settings.match_epochs else None
    return {"emulator": models.sub.emulator_lora(), "seconds": result["seconds"],
            "loss": result["history"][-1]["loss"] if result["history"] else None,
            "gradmatch": matched}


def match(models: ServerModels, settings: AlignSettings) -> dict:
    """Gradient matching (``fedsoda.align.gradmatch``) on the aligning task batches, with the
    global adapter both models hold: the first and last cosines and the seconds it took."""
    sub, cache = models.sub, models.public
    if not cache.option_ids:
        raise ValueError("align.match_epochs needs a task whose answers are one token each")
    steps = match_steps(len(cache.batches), settings.match_epochs)
    with phase(f"gradient matching ({settings.match_loss})", steps) as advance:
        result = match_gradients(models.teacher, sub.plan.full_adapter_layers, sub.model,
                                 list(sub.adapter_layers), list(sub.emulator_layers),
                                 list(cache.batches), list(cache.option_ids), settings.match_lr,
                                 settings.match_epochs, seed=settings.seed,
                                 on_step=lambda done, _total, _cosine: advance(done),
                                 loss=settings.match_loss)
    cosines = result["cosines"]
    return {"steps": result["steps"], "cosine_first": cosines[0], "cosine_last": cosines[-1],
            "seconds": result["seconds"]}


def evaluate_full(models: ServerModels, task, rows: list[dict], data_dir: str | None) -> dict:
    """Accuracy of the deliverable: the full LLM with the plugged global adapter; where the
    server keeps rows to fit its threshold on (``align.calibrate``), also the accuracy at that
    threshold, with the fit's figures under ``calibration``."""
    if models.cut_rows is None:
        return evaluate(models.teacher, models.tokenizer, task, rows, data_dir=data_dir)
    fitted = fit_cut(models.teacher, models.tokenizer, task, models.cut_rows)
    scored = evaluate(models.teacher, models.tokenizer, task, rows, data_dir=data_dir,
                      cut=fitted["cut"])
    return scored | {"calibration": fitted}


def evaluate_sub(models: ServerModels, task, rows: list[dict], data_dir: str | None) -> dict:
    """Accuracy of what clients see: the client model with both LoRA sets."""
    return evaluate(models.sub.model, models.tokenizer, task, rows, data_dir=data_dir)


def fidelity(models: ServerModels, batches: list[dict], option_ids: list[int] | None = None) -> dict:
    """Gradient fidelity of the client model against the full LLM, both holding the global
    adapter (``fedsoda.fidelity``); with ``option_ids``, under the option loss too."""
    sub = models.sub
    return gradient_fidelity(sub.model, list(sub.adapter_layers), models.teacher,
                             sub.plan.full_adapter_layers, batches, option_ids)


def export_adapter(models: ServerModels, folder: Path) -> Path:
    """The global adapter as a PEFT folder for the full LLM."""
    return export_peft(models.teacher, folder)
