"""Score a model on a task: accuracy by option likelihood or GSM8K exact match."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from fedsoda.data.gsm8k import SHOTS, few_shot_prefix
from fedsoda.data.task import Task, load_rows
from fedsoda.evaluate.generation import exact_match, greedy_answers
from fedsoda.evaluate.options import margin_report, option_scores
from fedsoda.phases import phase


def evaluation_rows(task: Task, data_dir: str | None, limit: int | None) -> list[dict]:
    rows = load_rows(task, task.eval_split, data_dir)
    return rows[:limit] if limit else rows


def evaluate(model: nn.Module, tokenizer, task: Task, rows: list[dict], batch_size: int = 16,
             max_tokens: int = 512, max_new_tokens: int = 256, data_dir: str | None = None,
             on_batch: Callable[[int, int], None] | None = None) -> dict:
    """``{"task", "accuracy", "n", "seconds"}`` on ``rows`` (deterministic, batched).

    A classification task also reports ``option_shares``: how often each option won. A plugged
    adapter that only moves the decision threshold shows there before anywhere else. A
    two-option task adds ``auc`` and ``best_threshold_accuracy`` of the option margin, which
    such an adapter does not move (``margin_report``).
    """
    if not rows:
        raise ValueError(f"no {task.name} rows to evaluate")
    began = time.perf_counter()
    model.eval()
    examples = [task.to_example(row) for row in rows]
    # Similar lengths share a batch so little compute goes to padding; order does not
    # change any score.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    correct = [False] * len(examples)
    chosen = [0] * len(examples)  # winning option per example (classification)
    margins = [0.0] * len(examples)  # score(option 1) - score(option 0), two-option tasks
    shots = ""
    if not task.is_classification:
        shots = few_shot_prefix(load_rows(task, task.train_split, data_dir)[:SHOTS])
    with phase(f"evaluation on {task.name}", len(order), "examples") as advance:
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            batch = [examples[i] for i in chunk]
            if task.is_classification:
                scores = option_scores(model, tokenizer, batch, task.options, max_tokens)
                winners = [max(range(len(s)), key=s.__getitem__) for s in scores]
                for index, winner, score in zip(chunk, winners, scores, strict=True):
                    chosen[index] = winner
                    margins[index] = score[-1] - score[0]
                hits = [winner == e.label for winner, e in zip(winners, batch, strict=True)]
            else:
                texts = greedy_answers(model, tokenizer, batch, shots, max_tokens * 4, max_new_tokens)
                hits = exact_match(texts, [e.label for e in batch])
            for index, hit in zip(chunk, hits, strict=True):
                correct[index] = hit
            done = min(start + batch_size, len(order))
            advance(done)
            if on_batch is not None:
                on_batch(done, len(order))
    result = {"task": task.name, "accuracy": sum(correct) / len(correct), "n": len(correct),
              "seconds": time.perf_counter() - began, "prompt": task.prompt_note}
    if task.is_classification:
        result["option_shares"] = {option.strip(): chosen.count(k) / len(chosen)
                                   for k, option in enumerate(task.options)}
        if len(task.options) == 2:
            result |= margin_report(margins, [example.label for example in examples])
    return result
