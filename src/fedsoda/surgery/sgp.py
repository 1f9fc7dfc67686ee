"""Similarity group pruning (FedSODA Algorithm 1) from a model spec: public data, layer
similarity, the chosen windows, and the plan cached by model content, data and settings.

The one entry point for a run's server, `fedsoda bench` and `fedsoda prune`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fedsoda.data.public import public_batches
from fedsoda.data.sources import data_dir as local_data_dir
from fedsoda.models import cache_dir, load, load_config, model_fingerprint
from fedsoda.phases import phase
from fedsoda.surgery.plan import PruneSettings, PruningPlan
from fedsoda.surgery.similarity import similarity_plan


def _log(message: str) -> None:
    print(f"[fedsoda] {message}", flush=True)


def plan_cache_path(model_hash: str, data_hash: str, settings: PruneSettings) -> Path:
    key = f"{model_hash}-{data_hash}-n{settings.n}-p{settings.p}-a{settings.adapter_layers}-{settings.token}"
    return cache_dir() / "plans" / f"{key}.json"


def sgp_plan(model_spec: str, settings: PruneSettings, data_dir: str | None, seed: int = 0,
             use_cache: bool = True, loaded: tuple | None = None) -> PruningPlan:
    """Similarity group pruning of ``model_spec``; the plan is cached by content.

    ``loaded`` passes an already loaded ``(model, tokenizer)`` so that it is not loaded twice.
    """
    began = time.perf_counter()
    # Validate the data folder and the config before paying for the weights.
    local_data_dir(data_dir)  # a wrong --data-dir fails here, not after a minute of loading
    settings.check_model(load_config(model_spec).num_hidden_layers)
    model, tokenizer = loaded or load(model_spec)
    batches, data_hash = public_batches(tokenizer, "validation", settings.samples,
                                        settings.seq_len, 8, data_dir, seed)
    model_hash = model_fingerprint(model)
    cached = plan_cache_path(model_hash, data_hash, settings)
    if use_cache and cached.exists():
        plan = PruningPlan.load(cached)
        _log(f"plan taken from cache {cached}")
    else:
        with torch.inference_mode(), phase("SGP: layer similarity", len(batches), "batches") as advance:
            plan = similarity_plan(model, batches, settings, model_spec, model_hash, data_hash,
                                   on_batch=advance)
        plan = dataclasses.replace(plan, seconds=time.perf_counter() - began)
        plan.save(cached)
    _log(f"groups {plan.groups}; sub-LLM keeps {plan.sub_num_layers} of {plan.num_layers} "
         f"layers; {time.perf_counter() - began:.1f} s")
    return plan
