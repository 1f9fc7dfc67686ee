"""`fedsoda prune` and `fedsoda build`: the server's model preparation, step by step."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

from fedsoda.align.oda import AlignSettings, pre_align, public_caches
from fedsoda.data.sources import data_dir as local_data_dir
from fedsoda.models import load, load_config
from fedsoda.surgery.build import make_sub_llm, save_sub_llm
from fedsoda.surgery.plan import PruneSettings, PruningPlan
from fedsoda.surgery.plugback import plug_adapter
from fedsoda.surgery.quantize import dense_bytes
from fedsoda.surgery.sgp import sgp_plan


def _log(message: str) -> None:
    print(f"[fedsoda] {message}", flush=True)


def prune(model_spec: str, settings: PruneSettings, data_dir: str | None, out: str | None,
          seed: int = 0, use_cache: bool = True) -> PruningPlan:
    """`fedsoda prune`: similarity group pruning (cached by content), the plan written to ``out``."""
    plan = sgp_plan(model_spec, settings, data_dir, seed, use_cache)
    if out:
        plan.save(out)
    return plan


def build(model_spec: str, plan_path: str, data_dir: str | None, out: str,
          settings: AlignSettings, device: str = "cpu") -> dict:
    """Build the NF4 sub-LLM with LoRA, pre-align it, and write ``out/`` with ``align.json``."""
    began = time.perf_counter()
    plan = PruningPlan.load(plan_path)
    config = load_config(model_spec)
    if config.num_hidden_layers != plan.num_layers:
        raise ValueError(f"plan {plan_path} is for a {plan.num_layers}-layer model but "
                         f"{model_spec} has {config.num_hidden_layers} layers")
    local_data_dir(data_dir)  # before the weights load
    full, tokenizer = load(model_spec, device=device)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sub = make_sub_llm(full, plan, out_dir, tokenizer, device=device, seed=settings.seed)
    teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), plan)
    public, heldout = public_caches(teacher, plan, tokenizer, settings, data_dir)

    def progress(step: int, total: int, record: dict) -> None:
        if step == 1 or step % 10 == 0 or step == total:
            _log(f"align step {step}/{total}: loss {record['loss']:.4f} kl {record['kl']:.4f}")

    aligned = pre_align(teacher, sub.model, plan, public, heldout, settings, on_step=progress)
    sizes = save_sub_llm(sub, out_dir)
    report = {
        "model": model_spec,
        **aligned,
        "settings": dataclasses.asdict(settings),
        "heldout": "wikitext2 test",
        "storage_bytes": sizes["client_model_bytes"],
        **sizes,
        "full_model_bf16_bytes": dense_bytes(full, 2),
        "seconds": time.perf_counter() - began,
    }
    report["storage_ratio_vs_full_bf16"] = report["storage_bytes"] / report["full_model_bf16_bytes"]
    (out_dir / "align.json").write_text(json.dumps(report, indent=2) + "\n")
    _log(f"alignment: KL {aligned['kl_before']:.4f} -> {aligned['kl_after']:.4f} "
         f"({100 * aligned['kl_reduction']:.1f}% lower), rep {aligned['rep_before']:.1f} -> "
         f"{aligned['rep_after']:.1f}; sub-LLM {sizes['client_model_bytes'] / 2**20:.1f} MiB vs full "
         f"bf16 {report['full_model_bf16_bytes'] / 2**20:.1f} MiB; {report['seconds']:.0f} s")
    return report
