"""What the server is doing during the long silent phases (similarity group pruning, the
teacher cache, pre-alignment, evaluation): a bar with the time spent and an estimate of the
time left while it runs, and one plain ``[fedsoda]`` line when it ends, so a log without a
terminal (CI, a file) still says how long each phase took.

rich allows one live display at a time: while a run's round bar is showing
(``federated.report.RunProgress``, which calls ``share``), a phase is a second row of that
display rather than a display of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from fedsoda import progress_feed

_shared: Progress | None = None  # the live display of a run, when one is showing

Advance = Callable[..., None]  # advance(done, total=None): how far the phase has come


def columns() -> tuple:
    """The columns of every bar: what, how far, time spent, time left, and a status."""
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"))


def share(progress: Progress | None) -> None:
    """Show phases as rows of ``progress`` (a run's live display) until called with None."""
    global _shared
    _shared = progress


@contextmanager
def phase(name: str, total: int, unit: str = "steps") -> Iterator[Advance]:
    """A bar for ``name`` over ``total`` ``unit``; yields ``advance(done, total=None)``."""
    if progress_feed.active():  # the server runs in a process of Flower's: `fedsoda run` draws
        with _fed_phase(name, total, unit) as advance:
            yield advance
        return
    began = time.perf_counter()
    own = _shared is None
    progress = Progress(*columns(), transient=True) if own else _shared
    task = progress.add_task(f"[fedsoda] {name}", total=total, status=unit)
    if own:
        progress.start()

    def advance(done: int, new_total: int | None = None) -> None:
        progress.update(task, completed=done, **({"total": new_total} if new_total else {}))

    try:
        yield advance
    finally:
        progress.remove_task(task)
        if own:
            progress.stop()
    print(ended(name, total, unit, began), flush=True)


def ended(name: str, total: int, unit: str, began: float) -> str:
    return f"[fedsoda] {name}: {total} {unit} in {time.perf_counter() - began:.1f} s"


@contextmanager
def _fed_phase(name: str, total: int, unit: str) -> Iterator[Advance]:
    """``phase`` as events of the progress feed."""
    began = time.perf_counter()
    progress_feed.emit("start", name=name, description=f"[fedsoda] {name}", total=total,
                       status=unit)

    def advance(done: int, new_total: int | None = None) -> None:
        progress_feed.emit("advance", name=name, done=done, total=new_total)

    try:
        yield advance
    finally:
        progress_feed.emit("end", name=name)
    line = ended(name, total, unit, began)
    progress_feed.emit("line", line=line)
    print(line, flush=True)  # Flower's log of the run keeps it too
