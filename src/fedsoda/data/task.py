"""What every task module provides, and how an example becomes token ids.

A task module (``sst2.py``, ``boolq.py``, ``gsm8k.py``) defines one ``Task``. Its
``to_example`` turns a data row into an ``Example``: a prompt in three parts (a fixed
prefix, a context that may be cut to fit, a fixed suffix), the answer text the model should
continue with, and the label the answer stands for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsoda.data.sources import (
    HUB_IDS,
    DataNotFoundError,
    MalformedDataError,
    data_dir,
    read_jsonl,
    split_file,
)

IGNORE_INDEX = -100  # label value that the causal-LM loss skips


def first_answer_positions(labels):
    """Each row's first labelled (answer) position in a ``[B, T]`` label tensor; the token
    before it is where the model decides the answer."""
    return (labels != IGNORE_INDEX).int().argmax(dim=1)


@dataclass(frozen=True)
class Example:
    prefix: str
    context: str  # cut from its end when the prompt is too long (BoolQ passages)
    suffix: str  # ends where the answer starts
    answer: str  # target continuation, e.g. " positive"
    label: int | str  # class index, or the final number for generation tasks

    @property
    def prompt(self) -> str:
        return self.prefix + self.context + self.suffix


@dataclass(frozen=True)
class Task:
    name: str
    train_split: str
    eval_split: str
    fields: dict  # local JSONL schema: field -> type
    to_example: Callable[[dict], Example]
    partition_key: Callable[[dict], int]  # label used for label-skewed partitions
    options: tuple[str, ...] = ()  # answer options of a classification task, by label
    prompt_note: str = ""  # how the prompt reads, for reports
    hub_rename: tuple[tuple[str, str], ...] = ()  # hub column -> local field
    hub_config: str | None = None

    @property
    def is_classification(self) -> bool:
        return bool(self.options)


def load_rows(task: Task, split: str, explicit_dir: str | Path | None = None) -> list[dict]:
    """Rows of a split, from the local folder if one is given, else from the hub."""
    if data_dir(explicit_dir) is not None:
        return read_jsonl(split_file(task.name, split, explicit_dir), task.fields)
    try:
        from datasets import load_dataset

        dataset = load_dataset(HUB_IDS[task.name], task.hub_config, split=split)
    except Exception as error:  # no network, unknown split, ...
        # Raises the clear "not found: use --data-dir or the hub id" error, chained to why.
        raise_missing(task, split, error)
    rows = [dict(row) for row in dataset]
    for old, new in task.hub_rename:
        for row in rows:
            row[new] = row.pop(old)
    return rows


def read_client_rows(task: Task, path: str | Path) -> list[dict]:
    """A client's own training rows (a SuperNode's ``data-path``): a JSON Lines file in the
    task's schema, or a folder holding ``<task>/<train split>.jsonl`` or ``<train split>.jsonl``.
    """
    path = Path(path).expanduser()
    candidates = [path] if path.is_file() else [path / task.name / f"{task.train_split}.jsonl",
                                                path / f"{task.train_split}.jsonl"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DataNotFoundError(f"this client's data-path {path} holds no {task.name} training "
                                f"data (looked for {', '.join(map(str, candidates))})")
    rows = read_jsonl(found, task.fields)
    if not rows:
        raise MalformedDataError(f"{found}: no rows; a client needs at least one example")
    return rows


def raise_missing(task: Task, split: str, error: Exception) -> None:
    try:
        split_file(task.name, split, None)
    except FileNotFoundError as missing:
        raise missing from error


def pad_id(tokenizer) -> int:
    """The id used for padding (masked out everywhere): pad, else end-of-sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer puts before any text (BOS for Llama-3/Gemma, none for SmolLM2)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer, example: Example, max_tokens: int, reserve: int = 0) -> list[int]:
    """Prompt ids of at most ``max_tokens - reserve``; only the context is ever cut."""
    head = special_prefix(tokenizer) + _ids(tokenizer, example.prefix)
    tail = _ids(tokenizer, example.suffix)
    budget = max_tokens - reserve - len(head) - len(tail)
    if budget < 0:
        raise ValueError(f"max_tokens={max_tokens} cannot hold the fixed prompt parts "
                         f"({len(head) + len(tail)} tokens) and the answer ({reserve})")
    return head + _ids(tokenizer, example.context)[:budget] + tail


def encode_answer(tokenizer, example: Example, with_eos: bool) -> list[int]:
    ids = _ids(tokenizer, example.answer)
    return ids + [tokenizer.eos_token_id] if with_eos else ids


def encode_for_training(tokenizer, example: Example, max_tokens: int,
                        with_eos: bool = False) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` with the loss on the answer tokens only."""
    answer = encode_answer(tokenizer, example, with_eos)
    if len(answer) >= max_tokens:
        answer = answer[: max_tokens // 2]  # a very long worked solution: keep its start
    prompt = encode_prompt(tokenizer, example, max_tokens, reserve=len(answer))
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}


class EncodedExamples(Sequence):
    """A client's rows, tokenized only when a mini-batch first draws them.

    A client may hold thousands of examples but train a few steps per round; encoding all
    of them up front would cost more than the training.
    """

    def __init__(self, task: Task, rows: list[dict], tokenizer, max_tokens: int) -> None:
        self.task, self.rows, self.tokenizer, self.max_tokens = task, rows, tokenizer, max_tokens
        self._cache: dict[int, dict[str, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index not in self._cache:
            example = self.task.to_example(self.rows[index])
            self._cache[index] = encode_for_training(self.tokenizer, example, self.max_tokens,
                                                     with_eos=not self.task.is_classification)
        return self._cache[index]


def widest_examples(task: Task, rows: list[dict], tokenizer, max_tokens: int,
                    count: int) -> EncodedExamples:
    """The ``count`` rows that encode longest (ties: answers with more tokens, then the earlier
    row): the widest mini-batch these rows can make, for measuring a training step's peak,
    which grows with the padded length and the labelled tokens."""
    encoded = EncodedExamples(task, rows, tokenizer, max_tokens)

    def widest_first(index: int) -> tuple[int, int, int]:
        example = encoded[index]
        answer = sum(label != IGNORE_INDEX for label in example["labels"])
        return -len(example["input_ids"]), -answer, index

    widest = sorted(range(len(rows)), key=widest_first)[:count]
    return EncodedExamples(task, [rows[index] for index in widest], tokenizer, max_tokens)
