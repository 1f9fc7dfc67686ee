"""SST-2 (GLUE): binary sentiment of a movie-review sentence, scored by option likelihood.

The "Review: ...\\nSentiment:" prompt scores 0.786 zero-shot on SmolLM2-135M against 0.596
for a weaker prompt (DESIGN 7b), so it is the one used.
"""

from fedsoda.data.task import Example, Task


def to_example(row: dict) -> Example:
    return Example(prefix="Review: ", context=row["sentence"].strip(), suffix="\nSentiment:",
                   answer=TASK.options[row["label"]], label=row["label"])


TASK = Task(
    name="sst2",
    train_split="train",
    eval_split="validation",
    fields={"sentence": str, "label": int},
    to_example=to_example,
    partition_key=lambda row: row["label"],
    options=(" negative", " positive"),
    prompt_note="Review: {sentence}\\nSentiment: -> ' negative' | ' positive'",
)
