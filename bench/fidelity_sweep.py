"""What moves gradient fidelity, and does the adapter then teach the full LLM?  Issue 17.

    FEDSODA_DATA_DIR=../shared/data python bench/fidelity_sweep.py --out bench/fidelity_sweep.json

For each variant a fresh client model is built and aligned as the variant says, then probed
with ``fedsoda.fidelity`` (the same probe a run keeps in ``fidelity.json``: 4 batches of 8
SST-2 training examples) with the initial adapter (B = 0). Its adapter LoRA then trains on the
client model as the quickstart's clients do, centralised (``--rounds`` rounds of ``--steps``
AdamW steps, batch 8, lr 3e-4, FedProx 0.01, a fresh optimizer each round, realignment after
round ``--realign-every`` as FedSODA does), and is probed again. Finally the trained adapter is
plugged into the full LLM and SST-2 validation is scored: accuracy, best-threshold accuracy
and AUC of the option margin (zero-shot first, as the reference).

Each probe also takes the option loss's figures (``options``: the loss over " negative" and
" positive" alone at the first answer token, the gradient that ranks examples); ``--table``
shows its cosines where a variant has them (runs after 2026-12-06:
``--out bench/fidelity_sweep_options.json``).

``--seed S`` (default 0, the figures above) draws another training order, alignment draw and
LoRA initialisation, for the spread: keep each seed in its own ``--out``; ``--spread OUT ...``
prints mean ± s.d. over the seeds of the variants every seed measured.

One model load; each plan's teacher cache is built once. Resumable: variants already in
``--out`` are skipped. Variants (``--variants``, comma-separated) are in ``VARIANTS``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

from fedsoda.align.gradmatch import match_gradients
from fedsoda.align.oda import AlignSettings, pre_align, public_caches, realign, task_caches
from fedsoda.data.task import EncodedExamples, load_rows, pad_id
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.tasks import evaluate, evaluation_rows
from fedsoda.fidelity import gradient_fidelity, option_token_ids, probe_batches, probe_rows
from fedsoda.methods import RECIPES
from fedsoda.methods.client_model import recipe_plan
from fedsoda.models import load
from fedsoda.spread import cell, mean_spread
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.lora import LoraSpec, load_lora_state, to_full
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.plugback import plug_adapter
from fedsoda.training import configure_threads, local_train

# name -> (recipe whose plan and emulator LoRA it uses, PruneSettings, AlignSettings (None: no
# alignment at all), LoRA rank, client lr (None: --lr)). The default is FedSODA's quickstart.
VARIANTS = {
    "unaligned": ("fedsoda", {}, None, 8, None),
    "default": ("fedsoda", {}, {}, 8, None),
    "uniform": ("fedsoda_uniform", {}, {}, 8, None),
    "epochs4": ("fedsoda", {}, {"epochs": 4}, 8, None),
    "emulator_all": ("fedsoda_all", {}, {}, 8, None),
    "mse_paper": ("fedsoda", {}, {"rep_loss": "mse", "alpha": 1e-4, "beta": 1.0}, 8, None),
    "adapter6": ("fedsoda", {"adapter_layers": 6}, {}, 8, None),
    "rank32": ("fedsoda", {}, {}, 32, None),
    "prune_half": ("fedsoda", {"p": 2}, {}, 8, None),
    "epochs16": ("fedsoda", {}, {"epochs": 16}, 8, None),
    "default_lr1e-3": ("fedsoda", {}, {}, 8, 1e-3),
    "adapter6_lr1e-3": ("fedsoda", {"adapter_layers": 6}, {}, 8, 1e-3),
    # Aligned on SST-2 training examples no client or probe holds (TASK_ALIGNED), not WikiText:
    "task_public": ("fedsoda", {}, {}, 8, None),
    "task_options": ("fedsoda", {}, {"option_weight": 1.0}, 8, None),
    "task_options_w10": ("fedsoda", {}, {"option_weight": 10.0}, 8, None),
    "task_options_epochs4": ("fedsoda", {}, {"option_weight": 1.0, "epochs": 4}, 8, None),
    "task_options_all": ("fedsoda_all", {}, {"option_weight": 1.0}, 8, None),
    "task_gradmatch": ("fedsoda", {}, {"option_weight": 1.0}, 8, None),
    "task_gradmatch_all": ("fedsoda_all", {}, {"option_weight": 1.0}, 8, None),
    "task_gradmatch_e8": ("fedsoda", {}, {"option_weight": 1.0}, 8, None),
    "task_gradmatch_e8_lr3e-3": ("fedsoda", {}, {"option_weight": 1.0}, 8, None),
    "task_gradmatch_rank": ("fedsoda", {}, {"option_weight": 1.0}, 8, None),
    "task_gradmatch_rank_e8": ("fedsoda", {}, {"option_weight": 1.0}, 8, None),
    "default_ranking": ("fedsoda", {}, {}, 8, None),  # the default again, with ranking figures
    "task_public_ranking": ("fedsoda", {}, {}, 8, None),
}
# Variants whose alignment data are task examples (the FedSODA paper's section 6.3.2), with
# the option KL at each example's decision position weighted by their ``option_weight``.
TASK_ALIGNED = {name for name in VARIANTS if name.startswith("task_")}
# Variants that then match the option-loss gradients themselves (fedsoda.align.gradmatch),
# after pre-alignment and after each realignment: epochs over the aligning batches, lr, loss.
GRADMATCH = {"task_gradmatch": (2, 1e-3, "options"), "task_gradmatch_all": (2, 1e-3, "options"),
             "task_gradmatch_e8": (8, 1e-3, "options"),
             "task_gradmatch_e8_lr3e-3": (8, 3e-3, "options"),
             "task_gradmatch_rank": (2, 1e-3, "ranking"),
             "task_gradmatch_rank_e8": (8, 1e-3, "ranking")}
# The ceilings: the adapter trained on the full LLM itself (fidelity 1 by construction), with
# the quickstart's adapter (3 layers) and lr, or the variant's: name -> (adapter layers, lr).
ORACLES = {"oracle": (3, None), "oracle_lr1e-3": (3, 1e-3), "oracle_adapter6": (6, None),
           "oracle_adapter6_lr1e-3": (6, 1e-3)}


def recipe_of(name: str):
    """FedSODA's recipe, or it with uniform dropping or LoRA on every emulator layer."""
    base = RECIPES["fedsoda"]
    return {"fedsoda": base,
            "fedsoda_uniform": dataclasses.replace(base, name=name, pruning="uniform"),
            "fedsoda_all": dataclasses.replace(base, name=name, emulator_lora="all")}[name]


def scores(model, tokenizer, task, rows) -> dict:
    """Accuracy, best-threshold accuracy and AUC of the option margin, as a run scores it."""
    scored = evaluate(model, tokenizer, task, rows)
    return {key: scored[key] for key in ("accuracy", "best_threshold_accuracy", "auc")}


def train_rounds(sub, plan, teacher, public, settings, train, args, pad, lr,
                 rematch=None) -> list[dict]:
    """The quickstart's client training, centralised; realigns as FedSODA does, then calls
    ``rematch(public)`` if given."""
    history = []
    for round_number in range(1, args.rounds + 1):
        trained = local_train(sub.model, sub.adapter_layers, train, args.steps, 8, lr,
                              0.01, 1000 * args.seed + round_number, pad)
        load_lora_state(teacher, to_full(trained["state"], plan.kept_layers))
        entry = {"round": round_number, "loss": trained["loss"]}
        if (public is not None and round_number % args.realign_every == 0
                and round_number < args.rounds):
            public, _ = realign(teacher, sub.model, plan, public, settings, round_number,
                                lora_layers=sub.emulator_layers)
            entry["realigned"] = True
            if rematch is not None:
                entry["gradmatch"] = rematch(public)
        history.append(entry)
    return history


def run_oracle(name, full, tokenizer, args, task, examples, train) -> dict:
    """The adapter layers trained on the full LLM: what any client model could at best give."""
    layers, lr = ORACLES[name]
    lr = lr or args.lr
    plan = recipe_plan(RECIPES["fedsoda"], args.model, full, tokenizer,
                       PruneSettings(adapter_layers=layers), args.data_dir)
    began = time.perf_counter()
    teacher = plug_adapter(copy.deepcopy(full), {}, plan)
    rounds = []
    for round_number in range(1, args.rounds + 1):
        trained = local_train(teacher, plan.full_adapter_layers, train, args.steps, 8, lr,
                              0.01, 1000 * args.seed + round_number, pad_id(tokenizer))
        rounds.append({"round": round_number, "loss": trained["loss"]})
    return {"adapter_layers": plan.full_adapter_layers, "lr": lr, "rounds": rounds,
            "scores": scores(teacher, tokenizer, task, examples),
            "seconds": time.perf_counter() - began}


def run_variant(name, full, tokenizer, args, task, examples, train, probe, caches, tmp,
                aligning_rows) -> dict:
    """``probe``: the fidelity batches and the option tokens; ``aligning_rows``: the task
    examples TASK_ALIGNED variants align on."""
    if name in ORACLES:
        return run_oracle(name, full, tokenizer, args, task, examples, train)
    recipe_name, prune_changes, align_changes, rank, lr = VARIANTS[name]
    lr = lr or args.lr
    recipe = recipe_of(recipe_name)
    data = {"data": "task"} if name in TASK_ALIGNED else {}
    settings = AlignSettings(**{"seed": args.seed, **data, **(align_changes or {})})
    plan = recipe_plan(recipe, args.model, full, tokenizer, PruneSettings(**prune_changes),
                       args.data_dir)
    began = time.perf_counter()
    sub = make_sub_llm(full, plan, f"{tmp}/{name}", tokenizer, LoraSpec(r=rank, alpha=2 * rank),
                       seed=settings.seed, emulator_lora=recipe.emulator_lora)
    teacher = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), plan, sub.spec)
    result: dict = {"plan": plan.kept_layers, "adapter_layers": plan.full_adapter_layers,
                    "rank": rank, "lr": lr, "align": align_changes,
                    "align_data": "sst2 train" if name in TASK_ALIGNED else "wikitext-2"}
    public = None
    if align_changes is not None:
        key = (tuple(plan.kept_layers), tuple(plan.full_adapter_layers), settings.samples,
               settings.seq_len, name in TASK_ALIGNED)
        # The teacher's emulator does not depend on the adapter: one cache per plan and data.
        if key not in caches and name in TASK_ALIGNED:
            caches[key] = task_caches(teacher, plan, tokenizer, task, aligning_rows, settings,
                                      tuple(probe[1]))
        elif key not in caches:
            caches[key] = public_caches(teacher, plan, tokenizer, settings, args.data_dir)
        public, heldout = caches[key]
        result["pre_align"] = pre_align(teacher, sub.model, plan, public, heldout, settings,
                                        lora_layers=sub.emulator_layers)
    full_layers = plan.full_adapter_layers
    rematch = None
    if name in GRADMATCH:
        epochs, match_lr, match_loss = GRADMATCH[name]

        def rematch(cache):
            return match_gradients(teacher, full_layers, sub.model, sub.adapter_layers,
                                   sub.emulator_layers, list(cache.batches), probe[1], match_lr,
                                   epochs, seed=args.seed, loss=match_loss)

        result["gradmatch"] = rematch(public)
    result["fidelity_initial"] = gradient_fidelity(sub.model, sub.adapter_layers, teacher,
                                                   full_layers, *probe)
    result["rounds"] = train_rounds(sub, plan, teacher, public, settings, train, args,
                                    pad_id(tokenizer), lr, rematch)
    result["fidelity_trained"] = gradient_fidelity(sub.model, sub.adapter_layers, teacher,
                                                   full_layers, *probe)
    result["scores"] = scores(teacher, tokenizer, task, examples)
    result["seconds"] = time.perf_counter() - began
    return result


def _cells(value: dict) -> list[str]:
    """A variant's probe cells: cosines (full-vocabulary loss, then the option loss where
    measured), emulator error and norm ratio; an oracle's are 1 and 0 by construction."""
    start, end = value.get("fidelity_initial"), value.get("fidelity_trained")
    if not start:
        return ["1 (the full LLM)", "0", "1", "1", "1", "1"]
    options = [f"{start['options']['cosine']:.2f}", f"{end['options']['cosine']:.2f}"] \
        if "options" in start else ["", ""]
    return [f"{start['cosine']:.2f}", f"{start['emulator_error']:.2f}", f"{end['cosine']:.2f}",
            f"{end['norm_ratio']:.2f}", *options]


def table(results: dict) -> str:
    """The README's table: one row per variant measured, zero-shot first."""
    zero = results["zero_shot"]
    lines = ["| variant | cosine, initial adapter | emulator error | cosine, trained | norm ratio, "
             "trained | option cosine, initial | option cosine, trained | accuracy "
             "| best-threshold | AUC |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| zero-shot (no adapter) | | | | | | | {100 * zero['accuracy']:.1f} "
             f"| {100 * zero['best_threshold_accuracy']:.1f} | {zero['auc']:.3f} |"]
    for name, value in results.items():
        if name in ("args", "zero_shot"):
            continue
        score = value["scores"]
        lines.append(f"| {name} | " + " | ".join(_cells(value)) + f" | {100 * score['accuracy']:.1f} "
                     f"| {100 * score['best_threshold_accuracy']:.1f} | {score['auc']:.3f} |")
    return "\n".join(lines) + "\n"


def by_seed(paths: list[str]) -> dict[int, dict]:
    """The results of several ``--out`` files by seed (files before 2026-12-06 are seed 0);
    a variant measured in two files of one seed is taken from the first. ``X_ranking`` is X
    measured again with the probe's ranking figures (same scores, deterministic): it stands
    for X."""
    seeds: dict[int, dict] = {}
    for path in paths:
        results = json.loads(Path(path).read_text())
        merged = seeds.setdefault(results["args"].get("seed", 0), {})
        for name, value in results.items():
            if name.endswith("_ranking"):
                merged[name.removesuffix("_ranking")] = value
            else:
                merged.setdefault(name, value)
    return seeds


def spread_table(paths: list[str]) -> str:
    """Mean ± s.d. over seeds of the scores and the ranking cosines of every variant that
    each seed measured (the README's three-seed table)."""
    seeds = by_seed(paths)
    names = [n for n in next(iter(seeds.values())) if n != "args"
             and all(n in results for results in seeds.values())]
    lines = [f"| variant ({len(seeds)} seeds: {', '.join(map(str, sorted(seeds)))}) | ranking "
             "cosine, initial | ranking cosine, trained | accuracy | best-threshold | AUC |",
             "|---|---|---|---|---|---|"]

    def seeds_cell(values: list[float], scale: float, digits: int) -> str:
        mean, sd = mean_spread(values)
        return cell(mean, 0.0 if sd is None else sd, scale, digits)  # one seed shows ± 0

    for name in names:
        runs = [results[name] for results in seeds.values()]
        scores = runs if name == "zero_shot" else [run["scores"] for run in runs]
        ranking = [[(run.get(when) or {}).get("ranking", {}).get("cosine") for run in runs]
                   for when in ("fidelity_initial", "fidelity_trained")]
        cosines = [seeds_cell(v, 1, 2) if None not in v else ("1" if name.startswith("oracle") else "")
                   for v in ranking]
        lines.append(f"| {name} | {' | '.join(cosines)} | "
                     f"{seeds_cell([s['accuracy'] for s in scores], 100, 1)} | "
                     f"{seeds_cell([s['best_threshold_accuracy'] for s in scores], 100, 1)} | "
                     f"{seeds_cell([s['auc'] for s in scores], 1, 3)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--realign-every", type=int, default=5)
    parser.add_argument("--eval-limit", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="0: the recorded figures")
    parser.add_argument("--variants", default=",".join([*ORACLES, *VARIANTS]))
    parser.add_argument("--out", default="fidelity_sweep.json")
    parser.add_argument("--table", action="store_true", help="print the table of --out, run nothing")
    parser.add_argument("--spread", nargs="+", metavar="OUT",
                        help="print mean ± s.d. over the seeds of these --out files, run nothing")
    args = parser.parse_args()
    if args.spread:
        print(spread_table(args.spread), end="")
        return
    if args.table:
        print(table(json.loads(Path(args.out).read_text())), end="")
        return
    names = args.variants.split(",")
    if unknown := sorted(set(names) - set(VARIANTS) - set(ORACLES)):
        parser.error(f"unknown variants {unknown}; choose from {', '.join([*ORACLES, *VARIANTS])}")
    configure_threads()
    task = get_task("sst2")
    full, tokenizer = load(args.model)
    examples = evaluation_rows(task, args.data_dir, args.eval_limit or None)  # scored rows
    rows = load_rows(task, task.train_split, args.data_dir)
    random.Random(1 + args.seed).shuffle(rows)  # seed 0: not the probe's draw (seed 0)
    used = args.rounds * args.steps * 8 * 2
    train = EncodedExamples(task, rows[:used], tokenizer, 256)
    probed = {json.dumps(row, sort_keys=True) for row in probe_rows(task, args.data_dir)}
    aligning_rows = [row for row in rows[used: used + 1000]
                     if json.dumps(row, sort_keys=True) not in probed]
    probe = (probe_batches(task, args.data_dir, tokenizer, 256, 4, 8),
             option_token_ids(tokenizer, task.options))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"args": vars(args)}

    def record(key: str, value) -> None:
        results[key] = value
        print(json.dumps({key: value})[:2000], flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")

    if "zero_shot" not in results:
        record("zero_shot", scores(full, tokenizer, task, examples))
    caches: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name not in results:
                record(name, run_variant(name, full, tokenizer, args, task, examples, train,
                                         probe, caches, tmp, aligning_rows))


if __name__ == "__main__":
    main()
