"""The long server phases show a bar (rows of a run's live display while it shows) and end
with one plain line saying how long they took."""

import pytest
from rich.console import Console
from rich.progress import Progress

from fedsoda import phases


def test_a_phase_on_its_own_ends_with_a_line(capsys):
    with phases.phase("teacher cache", 5, "batches") as advance:
        for done in range(1, 6):
            advance(done)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[fedsoda] teacher cache: 5 batches in ") and line.endswith(" s")


def test_a_phase_is_a_row_of_the_shared_display_and_leaves_it():
    progress = Progress(*phases.columns(), console=Console(file=open("/dev/null", "w")))
    progress.add_task("rounds", total=3, status="")
    phases.share(progress)
    try:
        with phases.phase("evaluation on sst2", 10, "examples") as advance:
            assert len(progress.tasks) == 2
            advance(4)
            row = progress.tasks[-1]
            assert (row.completed, row.total, row.description) == (4, 10, "[fedsoda] evaluation on sst2")
            advance(6, 12)  # the total may change
            assert progress.tasks[-1].total == 12
    finally:
        phases.share(None)
    assert [task.description for task in progress.tasks] == ["rounds"]


def test_a_failed_phase_prints_no_time_and_removes_its_row(capsys):
    progress = Progress(*phases.columns(), console=Console(file=open("/dev/null", "w")))
    phases.share(progress)
    try:
        with pytest.raises(RuntimeError), phases.phase("pre-alignment", 4) as advance:
            advance(1)
            raise RuntimeError("boom")
    finally:
        phases.share(None)
    assert not progress.tasks
    assert "pre-alignment" not in capsys.readouterr().out
