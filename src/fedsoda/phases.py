"""What the server is doing during the long silent phases (similarity group pruning, the
teacher cache, pre-alignment, evaluation): a bar with the time spent and an estimate of the
time left while it runs, and one plain ``[fedsoda]`` line when it ends, so a log without a
terminal (CI, a file) still says how long each phase took.

rich allows one live display at a time: while a run's round bar is showing
(``federated.report.RunProgress``, which calls ``share``), a phase is a second row of that
display rather than a display of its own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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


class Mirror:
    """Draws the events of a progress feed (``fedsoda.progress_feed``) written by a server in
    another process while a run goes: the round bar, a row per phase, and every
    finished round or phase as a plain line above them (a log without a terminal keeps those).
    """

    def __init__(self, path: Path, poll: float = 0.25) -> None:
        self.path, self.poll, self.offset = Path(path), poll, 0
        self.progress = Progress(*columns())
        self.tasks: dict[str, int] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> Mirror:
        self.progress.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
        self.read()  # what came after the last poll
        self.progress.stop()

    def _follow(self) -> None:
        while not self.stopped.wait(self.poll):
            self.read()

    def read(self) -> None:
        """Draw the events appended since the last read (whole lines only)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            self.draw(json.loads(line))

    def draw(self, event: dict) -> None:
        kind, name = event["event"], event.get("name", "")
        if kind == "start":
            self.tasks[name] = self.progress.add_task(
                event["description"], total=event["total"], completed=event.get("done", 0),
                status=event.get("status", ""))
        elif kind == "advance" and name in self.tasks:
            self.progress.update(self.tasks[name], completed=event["done"],
                                 **({"total": event["total"]} if event.get("total") else {}),
                                 **({"status": event["status"]} if "status" in event else {}))
        elif kind == "end" and name in self.tasks:
            self.progress.remove_task(self.tasks.pop(name))
        if event.get("line"):
            self.progress.console.print(event["line"], markup=False, highlight=False,
                                        soft_wrap=True)
