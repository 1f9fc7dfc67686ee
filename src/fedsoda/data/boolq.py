"""BoolQ: yes/no question about a Wikipedia passage, scored by option likelihood.

Passages can be long; the prompt is cut from the end of the passage only, never from the
question or the answer.
"""

from fedsoda.data.task import Example, Task


def to_example(row: dict) -> Example:
    label = int(row["label"])
    question = row["question"].strip()
    question = question[0].upper() + question[1:] if question else question
    return Example(prefix="Passage: ", context=row["passage"].strip(),
                   suffix=f"\nQuestion: {question}?\nAnswer:", answer=TASK.options[label],
                   label=label)


TASK = Task(
    name="boolq",
    train_split="train",
    eval_split="validation",
    fields={"question": str, "passage": str, "label": bool},
    to_example=to_example,
    partition_key=lambda row: int(row["label"]),
    options=(" no", " yes"),
    prompt_note="Passage: {passage}\\nQuestion: {question}?\\nAnswer: -> ' no' | ' yes'",
    hub_rename=(("answer", "label"),),
)
