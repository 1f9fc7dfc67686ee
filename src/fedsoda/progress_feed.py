"""Progress of a server that runs in another process.

Flower's supported path (`flwr run` against a SuperLink) starts the ServerApp in a process of
the SuperLink's and captures its output for `flwr log`, so the server cannot draw on the
terminal `fedsoda run` was started from. When ``FEDSODA_PROGRESS`` names a file, the server's
displays (``fedsoda.phases.phase`` and the round bar) append their events to it as JSON lines
instead of drawing, and ``fedsoda.phases.Mirror``, in the process that owns the terminal,
draws them with the same bars. One writer, one reader: the reader only ever sees whole lines.
"""

from __future__ import annotations

import json
import os
import time

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
