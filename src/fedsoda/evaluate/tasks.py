"""Score a model on a task: accuracy by option likelihood or GSM8K exact match."""

from __future__ import annotations

import time
from collections.abc import Callable

from torch import nn

from fedsoda.data.gsm8k import SHOTS, few_shot_prefix
from fedsoda.data.task import Task, load_rows
from fedsoda.evaluate.generation import exact_match, greedy_answers
from fedsoda.evaluate.options import best_cut, margin_report, option_scores
from fedsoda.phases import phase

# Beside an exported adapter (``adapter_config.json``): the option threshold the server fitted
# at its last evaluation (``align.calibrate``), which `fedsoda eval --adapter` applies.
CUT_FILE = "calibration.json"


def evaluation_rows(task: Task, data_dir: str | None, limit: int | None) -> list[dict]:
    rows = load_rows(task, task.eval_split, data_dir)
    return rows[:limit] if limit else rows


def _score(model: nn.Module, tokenizer, task: Task, examples: list, batch_size: int,
           max_tokens: int, max_new_tokens: int, data_dir: str | None, title: str,
           on_batch: Callable[[int, int], None] | None) -> tuple[list[bool], list[int], list[float]]:
    """Per example: right or not, the winning option (classification) and the option margin
    ``score(option 1) - score(option 0)`` (two-option tasks)."""
    model.eval()
    # Similar lengths share a batch so little compute goes to padding; order does not
    # change any score.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    correct = [False] * len(examples)
    chosen = [0] * len(examples)
    margins = [0.0] * len(examples)
    shots = ""
    if not task.is_classification:
        shots = few_shot_prefix(load_rows(task, task.train_split, data_dir)[:SHOTS])
    with phase(title, len(order), "examples") as advance:
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
    return correct, chosen, margins


def _accuracy_at(cut: float, margins: list[float], labels: list[int]) -> float:
    return sum((margin >= cut) == bool(label) for margin, label in zip(margins, labels, strict=True)) \
        / len(labels)


def evaluate(model: nn.Module, tokenizer, task: Task, rows: list[dict], batch_size: int = 16,
             max_tokens: int = 512, max_new_tokens: int = 256, data_dir: str | None = None,
             on_batch: Callable[[int, int], None] | None = None, cut: float | None = None) -> dict:
    """``{"task", "accuracy", "n", "seconds"}`` on ``rows`` (deterministic, batched).

    A classification task also reports ``option_shares``: how often each option won. A plugged
    adapter that only moves the decision threshold shows there before anywhere else. A
    two-option task adds ``auc`` and ``best_threshold_accuracy`` of the option margin, which
    such an adapter does not move (``margin_report``), and with ``cut`` (a threshold fitted
    elsewhere, ``fit_cut``) ``calibrated_accuracy``, the accuracy when the margin is cut there.
    """
    if not rows:
        raise ValueError(f"no {task.name} rows to evaluate")
    began = time.perf_counter()
    examples = [task.to_example(row) for row in rows]
    correct, chosen, margins = _score(model, tokenizer, task, examples, batch_size, max_tokens,
                                      max_new_tokens, data_dir, f"evaluation on {task.name}",
                                      on_batch)
    result = {"task": task.name, "accuracy": sum(correct) / len(correct), "n": len(correct),
              "seconds": time.perf_counter() - began, "prompt": task.prompt_note}
    if task.is_classification:
        result["option_shares"] = {option.strip(): chosen.count(k) / len(chosen)
                                   for k, option in enumerate(task.options)}
        if len(task.options) == 2:
            labels = [example.label for example in examples]
            result |= margin_report(margins, labels)
            if cut is not None:
                result |= {"calibrated_accuracy": _accuracy_at(cut, margins, labels), "cut": cut}
    return result


def fit_cut(model: nn.Module, tokenizer, task: Task, rows: list[dict], batch_size: int = 16,
            max_tokens: int = 512) -> dict:
    """The option-margin threshold that is right most often on ``rows`` (labelled rows the
    evaluation split does not hold): ``{"cut", "n", "accuracy_at_zero", "accuracy_at_cut"}``
    on those rows. Two-option tasks only."""
    if not task.is_classification or len(task.options) != 2:
        raise ValueError(f"a threshold cuts the margin of two answer options; {task.name} has "
                         f"{len(task.options) if task.is_classification else 'free-form'} answers")
    if not rows:
        raise ValueError(f"no {task.name} rows to fit a threshold on")
    examples = [task.to_example(row) for row in rows]
    _, _, margins = _score(model, tokenizer, task, examples, batch_size, max_tokens, 0, None,
                           f"threshold on {len(rows)} kept-back rows", None)
    labels = [example.label for example in examples]
    cut = best_cut(margins, labels)
    return {"cut": cut, "n": len(rows), "accuracy_at_zero": _accuracy_at(0.0, margins, labels),
            "accuracy_at_cut": _accuracy_at(cut, margins, labels)}
