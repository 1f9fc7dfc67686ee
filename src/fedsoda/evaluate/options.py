"""Classification by option log-likelihood: the option whose tokens the model finds most
likely after the prompt wins. Only the positions that predict option tokens go through
the LM head.
"""

from __future__ import annotations

import torch
from torch import nn

from fedsoda.data.task import Example, encode_prompt, pad_id
from fedsoda.models import unwrap


def _pad_right(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def sequence_logprobs(model: nn.Module, sequences: list[list[int]], starts: list[int],
                      pad_id: int) -> list[float]:
    """Sum of ``log p(token_j | tokens_<j)`` over ``j >= start`` for each sequence."""
    base = unwrap(model)
    ids, mask = _pad_right(sequences, pad_id)
    hidden = base.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    rows, cols = [], []
    for row, (seq, start) in enumerate(zip(sequences, starts, strict=True)):
        for position in range(start, len(seq)):
            rows.append(row)
            cols.append(position - 1)  # the hidden state that predicts token `position`
    logits = base.lm_head(hidden[rows, cols]).float()
    picked = torch.log_softmax(logits, dim=-1)[torch.arange(len(rows)), ids[rows, [c + 1 for c in cols]]]
    totals = torch.zeros(len(sequences), dtype=torch.float64)
    totals.index_add_(0, torch.tensor(rows), picked.double())
    return totals.tolist()


@torch.no_grad()
def next_token_logprobs(model: nn.Module, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """``log p(. | prompt)`` at the end of each prompt: ``[N, vocab]``, one LM-head row each."""
    base = unwrap(model)
    ids, mask = _pad_right(prompts, pad_id)
    hidden = base.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    last = torch.tensor([len(p) - 1 for p in prompts])
    return torch.log_softmax(base.lm_head(hidden[torch.arange(len(prompts)), last]).float(), -1)


def option_scores(model: nn.Module, tokenizer, examples: list[Example], options: tuple[str, ...],
                  max_tokens: int) -> list[list[float]]:
    """Log-likelihood of every option for every example (rows: examples, cols: options)."""
    option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    longest = max(map(len, option_ids))
    pad = pad_id(tokenizer)
    if longest == 1:  # every option is one token: one forward of the prompt scores them all
        prompts = [encode_prompt(tokenizer, example, max_tokens, reserve=1) for example in examples]
        logprobs = next_token_logprobs(model, prompts, pad)[:, [ids[0] for ids in option_ids]]
        return logprobs.double().tolist()
    sequences, starts = [], []
    for example in examples:
        prompt = encode_prompt(tokenizer, example, max_tokens, reserve=longest)
        for ids in option_ids:
            sequences.append(prompt + list(ids))
            starts.append(len(prompt))
    flat = sequence_logprobs(model, sequences, starts, pad)
    return [flat[i: i + len(options)] for i in range(0, len(flat), len(options))]


def _tie_groups(margins: list[float], labels: list[int]) -> list[tuple[float, int, int]]:
    """The distinct margins in rising order, each with how many examples have it and how many
    of those are labelled 1."""
    if len(margins) != len(labels) or not margins:
        raise ValueError("need one label per margin, and at least one")
    groups: dict[float, list[int]] = {}
    for margin, label in zip(margins, labels, strict=True):
        groups.setdefault(margin, []).append(label)
    return [(value, len(tied), sum(tied)) for value, tied in sorted(groups.items())]


def _right_by_cut(groups: list[tuple[float, int, int]], positives: int) -> list[int]:
    """How many examples a cut gets right (called 1 iff margin >= cut), sweeping the cut up
    through the tie groups: below all of them, then above each in turn."""
    right = [positives]  # cut below every margin: everything is called 1
    for _, count, ones in groups:
        right.append(right[-1] + (count - ones) - ones)  # the group now falls below the cut
    return right


def margin_report(margins: list[float], labels: list[int]) -> dict[str, float]:
    """How well ``margin = score(option 1) - score(option 0)`` separates the labels, at any
    threshold: ``auc`` (the chance a random label-1 example out-scores a random label-0 one,
    ties half) and ``best_threshold_accuracy`` (accuracy had the margin been cut at its best
    threshold instead of 0).

    Accuracy cuts at 0. A plugged adapter that only recalibrates the model moves that accuracy
    and neither of these; one that makes the model rank examples better raises them.
    """
    groups = _tie_groups(margins, labels)
    positives = sum(labels)
    negatives = len(labels) - positives
    rank_sum, start = 0.0, 0
    for _, count, ones in groups:
        rank_sum += ones * (2 * start + count + 1) / 2  # mean 1-based rank of the tie group
        start += count
    auc = ((rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
           if positives and negatives else float("nan"))
    return {"auc": auc, "best_threshold_accuracy": max(_right_by_cut(groups, positives)) / len(labels)}


def best_cut(margins: list[float], labels: list[int]) -> float:
    """The threshold ``c`` at which calling an example 1 iff ``margin >= c`` is right most
    often on these labelled examples: a midpoint between two neighbouring distinct margins
    (or 1 beyond the extremes). Of equally good cuts, the one nearest 0 (the least shift
    from plain option likelihood).

    The server fits it on training rows it keeps back and applies it to the evaluation split
    (``align.calibrate``): a plugged adapter whose last local steps left the threshold off
    keeps what it taught the model's ranking.
    """
    groups = _tie_groups(margins, labels)
    values = [value for value, _, _ in groups]
    between = [(a + b) / 2 for a, b in zip(values[:-1], values[1:], strict=True)]
    cuts = [values[0] - 1.0, *between, values[-1] + 1.0]
    right = _right_by_cut(groups, sum(labels))
    best = max(right)
    return min((cut for cut, score in zip(cuts, right, strict=True) if score == best), key=abs)
