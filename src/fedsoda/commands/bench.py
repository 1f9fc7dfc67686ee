"""`fedsoda bench`: every method's client step, memory, storage and communication, side by side
on this machine in one run, and the server's SGP, pre-alignment and realignment times.

What is measured and how is written up in ``bench/README.md``. In short: each method's client
model is built with the method's recipe (``fedsoda.methods``) from the same full model; each
is then measured in a fresh process (``python -m fedsoda.benchmark``) on the same batch of
fixed-length SST-2 sequences; ratios are taken between figures of this one run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from fedsoda.benchmark import (
    ClientUnderTest,
    interleaved_step_times,
    matmul_throughput,
    probe_client,
    workload,
)
from fedsoda.surgery.plan import PruneSettings
from fedsoda.training import configure_threads

TARGETS = {  # FedSODA's figure / the baseline's, at most (issue 6)
    "step_vs_fedpetuning": ("fedpetuning", "step_seconds", "step_seconds", 0.35),
    "step_cached_vs_fedpetuning": ("fedpetuning", "step_seconds_cached", "step_seconds", 0.10),
    "peak_memory_vs_fedpetuning": ("fedpetuning", "peak_memory_bytes", "peak_memory_bytes", 0.30),
    "storage_vs_fedpetuning": ("fedpetuning", "client_model_bytes", "client_model_bytes", 0.35),
    "comm_vs_fedbiot": ("fedbiot", "comm_bytes_per_round", "comm_bytes_per_round", 0.30),
}
RATIO_FIELDS = ("step_seconds", "step_seconds_cached", "peak_memory_bytes", "client_model_bytes",
                "comm_bytes_per_round", "step_flops")


def _log(message: str) -> None:
    print(f"[fedsoda bench] {message}", flush=True)


def machine_facts(device: str, threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"cpu_model": cpu, "cores": os.cpu_count(), "threads": threads,
             "torch": torch.__version__, "device": device, "python": platform.python_version(),
             "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(0)
    try:
        import bitsandbytes

        facts["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return facts


def comm_per_round(sub, recipe, realign_every: int) -> dict:
    """Bytes per round per client as Flower serializes them (float32 arrays): the adapter LoRA
    down and up, plus the emulator LoRA amortized over the rounds between realignments."""
    from fedsoda.federated.messages import record_bytes, record_params, to_record

    adapter = to_record(sub.adapter_lora())
    emulator = to_record(sub.emulator_lora()) if sub.emulator_layers else None
    emulator_bytes = record_bytes(emulator) if emulator is not None else 0
    per_round = recipe.comm_per_round(record_bytes(adapter), emulator_bytes, realign_every)
    return {"adapter_bytes": record_bytes(adapter), "adapter_params": record_params(adapter),
            "emulator_bytes": emulator_bytes,
            "emulator_sent_every_rounds": recipe.realign_every(realign_every),
            "emulator_bytes_per_round": per_round - 2 * record_bytes(adapter),
            "comm_bytes_per_round": per_round}


def server_timings(full, tokenizer, model_spec: str, data_dir: str | None, sub, folder: Path,
                   prune_settings: PruneSettings, quick: bool) -> dict:
    """FedSODA's server work: SGP from scratch, teacher caching, pre-alignment, one realignment."""
    from fedsoda.align import oda
    from fedsoda.align.oda import AlignSettings, public_caches
    from fedsoda.methods import get_recipe, server_models
    from fedsoda.surgery.plugback import plug_adapter
    from fedsoda.surgery.sgp import sgp_plan

    if quick:
        prune_settings = dataclasses.replace(prune_settings, samples=min(8, prune_settings.samples))
    # Quick: one batch for pre-alignment, the held-out measure and the realignment each.
    align = AlignSettings(samples=8, heldout=8, realign_samples=8) if quick else AlignSettings()
    began = time.perf_counter()
    sgp_plan(model_spec, prune_settings, data_dir, use_cache=False, loaded=(full, tokenizer))
    out = {"sgp_seconds": time.perf_counter() - began, "sgp_samples": prune_settings.samples}
    teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), sub.plan)
    began = time.perf_counter()
    public, heldout = public_caches(teacher, sub.plan, tokenizer, align, data_dir)
    out["teacher_cache_seconds"] = time.perf_counter() - began
    began = time.perf_counter()
    report = oda.pre_align(teacher, sub.model, sub.plan, public, heldout, align,
                           lora_layers=sub.emulator_layers)
    out.update(pre_align_seconds=time.perf_counter() - began, pre_align_steps=report["align_steps"],
               pre_align_train_seconds=report["align_seconds"], kl_before=report["kl_before"],
               kl_after=report["kl_after"])
    models = server_models.ServerModels(recipe=get_recipe("fedsoda"), teacher=teacher, sub=sub,
                                        tokenizer=tokenizer, folder=folder, public=public,
                                        heldout=heldout, sizes={}, full_bf16_bytes=0)
    began = time.perf_counter()
    server_models.realign(models, align, round_number=5)
    out["realign_seconds"] = time.perf_counter() - began
    out["realign_steps"] = len(oda.realign_indices(public, align, 5)) * align.realign_epochs
    out["align_settings"] = dataclasses.asdict(align)
    out["pre_align_seconds_per_step"] = out["pre_align_train_seconds"] / max(1, out["pre_align_steps"])
    return out


def build_client_models(model: str, methods: list[str], data_dir: str | None,
                        prune: PruneSettings, root: Path, quick: bool) -> tuple[dict, dict]:
    """Each method's client model folder, storage and comm; FedSODA's server timings."""
    from fedsoda.federated.config import RunConfig
    from fedsoda.methods import get_recipe
    from fedsoda.methods.client_model import build_client_model
    from fedsoda.models import load
    from fedsoda.surgery.build import save_sub_llm

    full, tokenizer = load(model)
    embedding = full.get_input_embeddings().weight
    figures, server = {}, {}
    for name in methods:
        recipe, folder = get_recipe(name), root / name
        shutil.rmtree(folder, ignore_errors=True)
        began = time.perf_counter()
        sub = build_client_model(recipe, model, full, tokenizer, prune, data_dir, folder / "subllm")
        plan = sub.plan
        plan.save(folder / "plan.json")
        build_seconds = time.perf_counter() - began
        if name == "fedsoda":
            _log("server: SGP, teacher cache, pre-alignment, one realignment")
            server = server_timings(full, tokenizer, model, data_dir, sub, folder / "subllm",
                                    prune, quick)
        sizes = save_sub_llm(sub, folder / "subllm")
        figures[name] = {**sizes, **comm_per_round(sub, recipe, RunConfig().realign_every),
                         "build_seconds": build_seconds, "quantization": recipe.quantization,
                         "layers": plan.sub_num_layers, "folder": str(folder / "subllm"),
                         "embedding_bytes_bf16": embedding.numel() * 2}
        figures[name]["embedding_share_of_storage"] = (figures[name]["embedding_bytes_bf16"]
                                                       / sizes["client_model_bytes"])
        _log(f"{name}: client model {sizes['client_model_bytes'] / 2**20:.1f} MiB, "
             f"{plan.sub_num_layers} layers, built in {build_seconds:.0f} s")
        del sub
    return figures, server


def ratios(methods: dict) -> dict:
    out = {}
    for base in ("fedpetuning", "fedbiot"):
        if base not in methods:
            continue
        out[f"vs_{base}"] = {
            name: {field: (figures[field] / methods[base][field]
                           if figures.get(field) and methods[base].get(field) else None)
                   for field in RATIO_FIELDS}
            for name, figures in methods.items()}
        for name, figures in methods.items():  # a cached step against the base's real step
            if figures.get("step_seconds_cached") and methods[base].get("step_seconds"):
                out[f"vs_{base}"][name]["step_seconds_cached"] = (
                    figures["step_seconds_cached"] / methods[base]["step_seconds"])
    return out


def targets(methods: dict) -> dict:
    out = {}
    soda = methods.get("fedsoda", {})
    for key, (base, mine, theirs, limit) in TARGETS.items():
        if base in methods and soda.get(mine) and methods[base].get(theirs):
            value = soda[mine] / methods[base][theirs]
            out[key] = {"value": value, "at_most": limit, "met": value <= limit}
    return out


def efficiency(figures: dict, throughput: dict) -> None:
    """Achieved FLOP/s of a step and its fraction of the machine's bf16 and fp32 matmul peak."""
    for suffix in ("", "_cached"):
        seconds, flops = figures.get(f"step_seconds{suffix}"), figures.get(f"step_flops{suffix}")
        if seconds and flops:
            achieved = flops / seconds
            figures[f"achieved_flops_per_second{suffix}"] = achieved
            figures[f"fraction_of_bf16_peak{suffix}"] = achieved / throughput["bfloat16_peak"]
            figures[f"fraction_of_fp32_peak{suffix}"] = achieved / throughput["float32_peak"]
            figures[f"seconds_at_bf16_peak{suffix}"] = flops / throughput["bfloat16_peak"]


def bench_command(args) -> dict:
    """`fedsoda bench`: the CLI's flags mapped onto ``run_bench``."""
    from fedsoda.methods import ORDER, RECIPES

    # By default every method with a Recipe: only those build a client model to measure.
    methods = args.methods or ",".join(m for m in ORDER if m in RECIPES)
    return run_bench(args.model, [m.strip() for m in methods.split(",") if m.strip()],
                     bool(args.quick), args.steps, args.batch_size, args.seq_len, args.device,
                     args.data_dir, args.out, threads=getattr(args, "threads", None))


def run_bench(model: str, methods: list[str], quick: bool = False, steps: int | None = None,
              batch_size: int = 8, seq_len: int = 128, device: str | None = None,
              data_dir: str | None = None, out: str = "bench.json",
              prune: PruneSettings = PruneSettings(), threads: int | None = None) -> dict:
    """Build every method's client model, measure it in a fresh process, write ``out``."""
    began = time.perf_counter()
    steps, warmup = steps or (3 if quick else 10), 1 if quick else 2
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = configure_threads(threads)
    from fedsoda.methods import get_recipe
    from fedsoda.models import cache_dir, load_config

    config = load_config(model)
    facts = machine_facts(device, threads)
    _log(f"{facts['cpu_model']}, {threads} thread(s), device {device}; matmul throughput")
    throughput = matmul_throughput(device, batch_size * seq_len, config.hidden_size,
                                   config.intermediate_size)
    root = cache_dir() / "bench" / Path(str(model)).name
    figures, server = build_client_models(model, methods, data_dir, prune, root, quick)
    env = {**os.environ, "FEDSODA_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    # FedBiOT's trainer could use the cache, its schedule cannot: realigned every round.
    cached = tuple(m for m in methods if get_recipe(m).realign != "every_round")
    for name in methods:
        _log(f"{name}: peak memory and FLOPs in a fresh process")
        figures[name].update(probe_client(figures[name]["folder"], seq_len, batch_size, warmup,
                                          data_dir, device, cached=name in cached, env=env))
    _log(f"step times, all methods in turns: {warmup} warm-up + {steps} timed each")
    pool = workload(figures[methods[0]]["folder"], seq_len, batch_size, data_dir)
    clients = {name: ClientUnderTest(figures[name]["folder"], pool, batch_size, device)
               for name in methods}
    timings = interleaved_step_times(clients, steps, warmup, cached=cached,
                                     whole_model=() if quick else ("fedsoda",))
    del clients
    for name in methods:
        figures[name].update(timings[name])
        if get_recipe(name).realign == "every_round":
            figures[name]["cache_note"] = ("realigned every round: the cache would be emptied "
                                           "every round, so its steady step is the uncached one")
        efficiency(figures[name], throughput)
    result = {"methods": figures, "ratios": ratios(figures), "targets": targets(figures),
              "server": server, "machine": {**facts, "matmul_flops_per_second": throughput},
              "settings": {"model": model, "batch_size": batch_size, "seq_len": seq_len,
                           "steps": steps, "warmup": warmup, "quick": quick,
                           "prune": dataclasses.asdict(prune),
                           "workload": "fixed-length SST-2 k-shot sequences"},
              "seconds": time.perf_counter() - began}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    _log(f"wrote {out} in {result['seconds']:.0f} s")
    return result


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def print_tables(result: dict) -> None:
    """The per-method table (ratios against FedPETuning, comm against FedBiOT), then the
    server's timings and the targets."""
    from rich.console import Console
    from rich.table import Table

    methods, vs_pet = result["methods"], result["ratios"].get("vs_fedpetuning", {})
    vs_biot = result["ratios"].get("vs_fedbiot", {})
    s = result["settings"]
    table = Table(title=f"Client step, {s['model']}, batch {s['batch_size']} x {s['seq_len']} "
                        f"tokens, {result['machine']['device']}, {result['machine']['threads']} thread(s)")
    for column in ("method", "step s", "cached s", "step/PET", "cached/PET", "peak MiB", "mem/PET",
                   "store MiB", "store/PET", "comm KiB", "comm/BiOT", "GFLOP", "GFLOP/s",
                   "% bf16 pk"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, f in methods.items():
        pet, biot = vs_pet.get(name, {}), vs_biot.get(name, {})
        table.add_row(name, _fmt(f.get("step_seconds"), digits=3),
                      _fmt(f.get("step_seconds_cached"), digits=3),
                      _fmt(pet.get("step_seconds"), digits=3),
                      _fmt(pet.get("step_seconds_cached"), digits=3),
                      _fmt(f.get("peak_memory_bytes"), 2**20, 0), _fmt(pet.get("peak_memory_bytes")),
                      _fmt(f.get("client_model_bytes"), 2**20, 1), _fmt(pet.get("client_model_bytes")),
                      _fmt(f.get("comm_bytes_per_round"), 2**10, 0),
                      _fmt(biot.get("comm_bytes_per_round")), _fmt(f.get("step_flops"), 1e9, 1),
                      _fmt(f.get("achieved_flops_per_second"), 1e9, 1),
                      _fmt(f.get("fraction_of_bf16_peak"), 0.01, 1))
    console = Console(width=max(Console().width, 150))  # a pipe would get 80 columns
    console.print(table)
    server = result["server"]
    if server:
        console.print(f"server (FedSODA): SGP {server['sgp_seconds']:.1f} s ({server['sgp_samples']} "
                      f"samples); teacher cache {server['teacher_cache_seconds']:.1f} s; pre-alignment "
                      f"{server['pre_align_seconds']:.1f} s ({server['pre_align_steps']} steps, "
                      f"{server['pre_align_seconds_per_step']:.2f} s/step); one realignment "
                      f"{server['realign_seconds']:.1f} s ({server['realign_steps']} steps)")
    peaks = result["machine"]["matmul_flops_per_second"]
    console.print(f"matmul peak: fp32 {peaks['float32_peak'] / 1e9:.1f} GFLOP/s, "
                  f"bf16 {peaks['bfloat16_peak'] / 1e9:.1f} GFLOP/s")
    for key, target in result["targets"].items():
        console.print(f"target {key}: {target['value']:.3f} (at most {target['at_most']}) "
                      f"{'met' if target['met'] else 'NOT met'}")
