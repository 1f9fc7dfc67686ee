"""The tasks fedsoda knows, by name."""

from fedsoda.data import boolq, gsm8k, sst2
from fedsoda.data.task import Task

TASKS: dict[str, Task] = {module.TASK.name: module.TASK for module in (sst2, boolq, gsm8k)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]
