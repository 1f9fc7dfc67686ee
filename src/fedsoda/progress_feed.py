"""Progress of a server that runs in another process.

Flower's supported path (`flwr run` against a SuperLink) starts the ServerApp in a process of
the SuperLink's and captures its output for `flwr log`, so the server cannot draw on the
terminal `fedsoda run` was started from. When ``FEDSODA_PROGRESS`` names a file, the server's
displays (``fedsoda.phases.phase`` and the round bar) append their events to it as JSON lines
instead of drawing, and ``Mirror``, in the process that owns the terminal, draws them with the
same bars. One writer, one reader: the reader only ever sees whole lines.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ENV = "FEDSODA_PROGRESS"
_last_advance: dict[str, float] = {}  # phase name -> when its last advance was written
ADVANCE_EVERY = 0.5  # seconds between two advance events of a phase (the bar's refresh)


def active() -> bool:
    """Whether this process reports its progress to a feed rather than drawing it."""
    return bool(os.environ.get(ENV))


def emit(event: str, **fields) -> None:
    """Append one event to the feed (a no-op without one)."""
    path = os.environ.get(ENV)
    if not path:
        return
    if event == "advance" and "line" not in fields:  # a bar needs a few updates a second
        now = time.monotonic()
        if now - _last_advance.get(fields["name"], 0.0) < ADVANCE_EVERY:
            return
        _last_advance[fields["name"]] = now
    with open(path, "a") as handle:
        handle.write(json.dumps({"event": event, **fields}) + "\n")


class Mirror:
    """Draws a feed's events while a run goes: the round bar, a row per phase, and every
    finished round or phase as a plain line above them (a log without a terminal keeps those).
    """

    def __init__(self, path: Path, poll: float = 0.25) -> None:
        from rich.progress import Progress

        from fedsoda import phases

        self.path, self.poll, self.offset = Path(path), poll, 0
        self.progress = Progress(*phases.columns())
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
