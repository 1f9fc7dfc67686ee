"""What does a sub-LLM-trained adapter change in the full LLM, round by round?

    FEDSODA_DATA_DIR=../shared/data python bench/transfer_rounds.py --out bench/transfer_rounds.json

A centralised stand-in for the quickstart (one trainer, a fresh AdamW every "round" as a
client has, FedProx mu 0.01): the default pre-aligned NF4 sub-LLM trains its adapter LoRA for
``--rounds`` rounds of ``--steps`` steps; after chosen rounds the adapter is plugged into the
full LLM and SST-2 validation is scored three ways:
- ``accuracy``: as every run scores it (the likelier option wins);
- ``positive_share``: how often " positive" wins (the truth is 0.509);
- ``best_threshold_accuracy``: the accuracy had the margin ``score(positive) - score(negative)``
  been cut at its best threshold instead of 0. It does not move when the adapter only shifts
  the decision (a calibration change) and rises only when the adapter ranks examples better.

Variants: ``default`` (realign after round 5, as FedSODA does), ``norealign`` and ``cosine``
(the client lr decays over the rounds). All start from the same pre-aligned emulator.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import tempfile

import torch

from fedsoda.align.oda import AlignSettings, pre_align, public_caches, realign
from fedsoda.commands.model_prep import prune
from fedsoda.data.task import EncodedExamples, load_rows, pad_id
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.options import margin_report, option_scores
from fedsoda.evaluate.tasks import evaluation_rows
from fedsoda.models import load
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.lora import load_lora_state
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.plugback import plug_adapter, to_full_names
from fedsoda.training import configure_threads, local_train

VARIANTS = ("default", "norealign", "cosine")


def margins(model, tokenizer, task, examples) -> torch.Tensor:
    """``score(option 1) - score(option 0)`` for every example."""
    scores = []
    for start in range(0, len(examples), 16):
        scores += option_scores(model, tokenizer, examples[start: start + 16], task.options, 512)
    scores = torch.tensor(scores)
    return scores[:, 1] - scores[:, 0]


def decision_report(margin: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = (margin > 0).long()
    return {"accuracy": (predicted == labels).float().mean().item(),
            "positive_share": predicted.float().mean().item(),
            "best_threshold_accuracy": margin_report(margin.tolist(), labels.tolist())[
                "best_threshold_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--realign-every", type=int, default=5)
    parser.add_argument("--score-rounds", default="3,5,7,10")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="transfer_rounds.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := sorted(set(variants) - set(VARIANTS)):
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    score_rounds = {int(r) for r in args.score_rounds.split(",")}
    configure_threads()
    task = get_task("sst2")
    full, tokenizer = load(args.model)
    plan = prune(args.model, PruneSettings(), args.data_dir, None, loaded=(full, tokenizer))
    examples = [task.to_example(row) for row in evaluation_rows(task, args.data_dir, None)]
    labels = torch.tensor([example.label for example in examples])
    train_rows = load_rows(task, task.train_split, args.data_dir)
    random.Random(0).shuffle(train_rows)
    train = EncodedExamples(task, train_rows[:args.rounds * args.steps * args.batch_size * 2],
                            tokenizer, 256)
    settings = AlignSettings()
    results: dict = {"args": vars(args), "truth_positive_share": labels.float().mean().item()}

    def record(key: str, value) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)

    with tempfile.TemporaryDirectory() as tmp:
        sub = make_sub_llm(full, plan, f"{tmp}/sub", tokenizer, seed=settings.seed)
        untrained = sub.adapter_lora()
        teacher = plug_adapter(copy.deepcopy(full), untrained, plan)
        record("zero_shot", decision_report(margins(teacher, tokenizer, task, examples), labels))
        public, heldout = public_caches(teacher, plan, tokenizer, settings, args.data_dir)
        record("pre_align", pre_align(teacher, sub.model, plan, public, heldout, settings,
                                      lora_layers=sub.emulator_layers))
        aligned = sub.emulator_lora()
        for variant in variants:
            load_lora_state(sub.model, aligned | untrained)
            load_lora_state(teacher, to_full_names(untrained, plan))
            history = []
            for round_number in range(1, args.rounds + 1):
                lr = args.lr
                if variant == "cosine":
                    lr *= 0.5 * (1 + math.cos(math.pi * (round_number - 1) / args.rounds))
                trained = local_train(sub.model, sub.adapter_layers, train, args.steps,
                                      args.batch_size, lr, 0.01, round_number, pad_id(tokenizer))
                load_lora_state(teacher, to_full_names(trained["state"], plan))
                entry = {"round": round_number, "lr": lr, "sub_loss": trained["loss"]}
                if round_number in score_rounds:
                    entry |= decision_report(margins(teacher, tokenizer, task, examples), labels)
                if (variant != "norealign" and round_number % args.realign_every == 0
                        and round_number < args.rounds):
                    public, _ = realign(teacher, sub.model, plan, public, settings, round_number,
                                        lora_layers=sub.emulator_layers)
                    entry["realigned"] = True
                history.append(entry)
                print(json.dumps({variant: entry}), flush=True)
            record(variant, history)


if __name__ == "__main__":
    main()
