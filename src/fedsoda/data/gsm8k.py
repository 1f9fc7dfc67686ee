"""GSM8K: grade-school maths word problems; 4-shot greedy generation, exact match of the
final number.

GSM8K has no label, so label-skewed partitions use a derived key: the number of reasoning
steps in the reference solution (its lines before ``#### N``), bucketed into four classes
0: 1-2 steps, 1: 3 steps, 2: 4 steps, 3: 5 or more. Clients then differ in problem
difficulty, the closest analogue of label skew.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from fedsoda.data.task import Example, Task

SHOTS = 4
_NUMBER = re.compile(r"-?\$?-?\d[\d,]*(?:\.\d+)?")


def final_answer(solution: str) -> str:
    """The number after ``####`` in a reference solution."""
    return normalize_number(solution.rsplit("####", 1)[-1]) or ""


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"-7."`` -> ``"-7"``; the first number in ``text``."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    raw = match.group(0).replace("$", "").replace(",", "")
    negative = raw.count("-") % 2 == 1
    try:
        value = Decimal(raw.replace("-", ""))
    except InvalidOperation:
        return None
    value = -value if negative else value
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def extract_answer(generation: str) -> str | None:
    """The model's final number: after ``####`` if present, else the last number."""
    generation = generation.split("\nQuestion:")[0]
    if "####" in generation:
        return normalize_number(generation.split("####", 1)[1])
    numbers = _NUMBER.findall(generation)
    return normalize_number(numbers[-1]) if numbers else None


def reasoning_steps(solution: str) -> int:
    return sum(1 for line in solution.split("####")[0].splitlines() if line.strip())


def difficulty_bucket(row: dict) -> int:
    return min(max(reasoning_steps(row["answer"]) - 2, 0), 3)


def to_example(row: dict) -> Example:
    return Example(prefix="Question: ", context=row["question"].strip(), suffix="\nAnswer:",
                   answer=" " + row["answer"].strip(), label=final_answer(row["answer"]))


def few_shot_prefix(shots: list[dict]) -> str:
    """Worked examples in the same format as the question that follows them."""
    return "".join(to_example(row).prompt + to_example(row).answer + "\n\n" for row in shots)


TASK = Task(
    name="gsm8k",
    train_split="train",
    eval_split="test",
    fields={"question": str, "answer": str},
    to_example=to_example,
    partition_key=difficulty_bucket,
    prompt_note="4 worked train examples, then Question: {question}\\nAnswer: (greedy)",
    hub_config="main",
)
