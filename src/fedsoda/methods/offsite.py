"""The offsite-tuning family on the heterogeneous-client runtime: FedSODA, FedPETuning, FedOT
and FedBiOT, each a ``Recipe`` (see their modules), all run by these functions.

Every sampled client gets the same assignment: it holds the recipe's client model (the
sub-LLM folder, full-model layers ``plan.kept_layers``), trains the adapter LoRA (full-model
layers ``plan.full_adapter_layers``) and holds the server-trained emulator LoRA. After each
round's aggregation the server puts the global adapter into the teacher and the student, and
realigns every ``realign_every`` rounds.

The functions every method module provides, in the order the runtime calls them:
``prepare`` (server models and client files), ``initial_state``, ``load_state``, ``assign``,
``after_round`` (after aggregation), ``evaluate``, ``summary``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsoda.data.tasks import get_task
from fedsoda.evaluate.tasks import CUT_FILE
from fedsoda.fidelity import option_token_ids, probe_batches
from fedsoda.methods import server_models
from fedsoda.methods.assignment import Assignment
from fedsoda.methods.recipe import Recipe
from fedsoda.models.loading import file_sha256
from fedsoda.surgery.lora import LoraSpec, load_lora_state, to_full, to_local

log = logging.getLogger("fedsoda.server")


@dataclass
class Offsite:
    """A run's server side for a recipe method."""

    recipe: Recipe
    models: server_models.ServerModels
    files: dict[str, tuple[str, Path]]  # client model file name -> (sha256, path)
    probe: list[dict] = field(default_factory=list)  # gradient-fidelity batches (may be none)
    probe_options: list[int] | None = None  # the task's option tokens, for the option loss

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.models.sub.plan.kept_layers)

    @property
    def lora(self) -> LoraSpec:
        return self.models.sub.spec


def folder_files(folder: Path) -> dict[str, tuple[str, Path]]:
    """Every file of a model folder by name, with its content hash."""
    return {p.name: (file_sha256(p), p) for p in sorted(folder.iterdir()) if p.is_file()}


def prepare(cfg, out: Path, resume: bool) -> Offsite:
    """The recipe's client model (built, or reopened on resume) and the server's models."""
    from fedsoda.methods import get_recipe  # the package's registry imports this module

    recipe = get_recipe(cfg.method).as_run(cfg.pre_align, cfg.realign_every)
    models = server_models.prepare(recipe, cfg.model, cfg.prune, cfg.align, cfg.data_folder,
                                   out, cfg.task, pre_align=not resume)
    server = Offsite(recipe=recipe, models=models, files=folder_files(models.folder / "model"))
    if cfg.align.fidelity_batches:
        try:
            task = get_task(cfg.task)
            server.probe = probe_batches(task, cfg.data_folder, models.tokenizer,
                                         cfg.max_tokens, cfg.align.fidelity_batches,
                                         cfg.align.batch_size)
            if task.is_classification:
                server.probe_options = option_token_ids(models.tokenizer, task.options)
        except FileNotFoundError:  # a deployed server holds no training split: no probe
            log.warning("no %s training split on the server: the gradient-fidelity probe is "
                        "off (set align.fidelity_batches = 0 to say so)", cfg.task)
    if server.probe and not resume:  # the initial adapter (B = 0) after pre-alignment: round 0
        write_fidelity(out, {0: server_models.fidelity(models, server.probe, server.probe_options)})
    return server


def write_fidelity(out: Path, rounds: dict[int, dict]) -> None:
    """``fidelity.json``: the probe's figures by round, merged into what the file holds."""
    path = out / "fidelity.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    kept.update({str(r): figures for r, figures in rounds.items()})
    path.write_text(json.dumps(dict(sorted(kept.items(), key=lambda kv: int(kv[0]))),
                               indent=1) + "\n")


def record_rematch(path: Path, round_number: int, figures: dict) -> None:
    """The gradient matching after a realignment, by round, beside pre-alignment's figures."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    kept.setdefault("gradmatch_by_round", {})[str(round_number)] = figures
    path.write_text(json.dumps(kept, indent=2) + "\n")


def initial_state(server: Offsite) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The global adapter LoRA and the emulator LoRA before round 1 (full-model names)."""
    sub = server.models.sub
    return to_full(sub.adapter_lora(), server.layers), to_full(sub.emulator_lora(), server.layers)


def load_state(server: Offsite, state) -> None:
    """Put a (resumed) state's global adapter and emulator LoRA into the server's models."""
    server_models.set_global_adapter(server.models, state.adapter)
    load_lora_state(server.models.sub.model, to_local(state.emulator, server.layers))


def assign(server: Offsite, cfg, state, sampled: list[int]) -> dict[int, Assignment]:
    """The same assignment for every sampled client."""
    sub = server.models.sub
    one = Assignment(layers=server.layers, trainable=tuple(sub.plan.full_adapter_layers),
                     files=tuple((name, digest) for name, (digest, _) in server.files.items()),
                     kind="folder", quantization=sub.quantization,
                     frozen_lora=tuple(server.layers[i] for i in sub.emulator_layers),
                     local_steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, mu=cfg.mu)
    return {pid: one for pid in sampled}


def after_round(server: Offsite, cfg, state) -> bool:
    """The new global adapter into teacher and student; realign if the schedule says so
    (``cfg.realign_every`` is the method's resolved period; no realignment after the last
    round). Returns whether it realigned."""
    server_models.set_global_adapter(server.models, state.adapter)
    every = cfg.realign_every
    if not (every and state.round % every == 0 and state.round < cfg.rounds):
        return False
    realigned = server_models.realign(server.models, cfg.align, state.round)
    if realigned["gradmatch"]:
        record_rematch(Path(cfg.out) / "align.json", state.round, realigned["gradmatch"])
    state.emulator = to_full(realigned["emulator"], server.layers)
    state.emulator_version += 1
    return True


def evaluate(server: Offsite, task, rows: list[dict], data_dir: str | None) -> dict:
    """The deliverable: the full LLM with the plugged global adapter; with the gradient
    fidelity of the client model against it (``fedsoda.fidelity``) when the run probes."""
    scored = server_models.evaluate_full(server.models, task, rows, data_dir)
    if server.probe:
        scored["fidelity"] = server_models.fidelity(server.models, server.probe,
                                                    server.probe_options)
    return scored


def summary(server: Offsite, cfg, state, out: Path, task, rows: list[dict]) -> dict:
    """Export the adapter; what a client holds, downloads and needs in memory."""
    from fedsoda.accounting import client_peak_memory  # runs a probe process

    models = server.models
    server_models.export_adapter(models, out / "adapter")
    fitted = [m["calibration"] for m in state.metrics if "calibration" in m]
    if fitted:  # the last evaluation's threshold travels with the adapter (`fedsoda eval`)
        (out / "adapter" / CUT_FILE).write_text(json.dumps(
            {**fitted[-1], "options": list(task.options)}, indent=1) + "\n")
    if server.probe:  # the evaluated rounds' figures beside round 0's
        write_fidelity(out, {m["round"]: m["fidelity"] for m in state.metrics if "fidelity" in m})
    aligning = {"align_data": cfg.align.data, "match_epochs": cfg.align.match_epochs} \
        if server.recipe.aligns else {}
    if cfg.align.calibrate:  # the evaluations' calibrated_accuracy: a row of its own in reports
        aligning["calibrate"] = True
    return {
        **server.recipe.columns, **aligning,
        "accuracy_sub": server_models.evaluate_sub(models, task, rows, cfg.data_folder)["accuracy"],
        "trainable_params": sum(t.numel() for t in state.adapter.values()),
        # What one client downloads to join, cached or not (the runtime counts its bytes).
        "client_download_files": [p for _, p in server.files.values()],
        "client_model_bytes": models.sizes["client_model_bytes"],
        "client_peak_memory_bytes": client_peak_memory(models.folder, cfg.task, cfg.batch_size,
                                                       cfg.max_tokens, cfg.data_folder),
        "full_model_bf16_bytes": models.full_bf16_bytes,
    }
