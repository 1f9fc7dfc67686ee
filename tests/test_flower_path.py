"""`fedsoda run` goes through Flower's supported path (a SuperLink of its own and `flwr run`),
and gives what the in-process engine the fault tests use gives: the same adapter, bit for bit,
and the same metrics, with no deprecation warning and the server's progress drawn here."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedsoda import cli, progress_feed
from fedsoda.federated.config import load_config
from fedsoda.federated.simulation import simulate
from test_flwr_run import TINY, metrics_without_times


@pytest.mark.slow
@pytest.mark.ci
def test_fedsoda_run_on_a_superlink_gives_the_in_process_adapter(
        tiny_model_dir, shared_data, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache-flwr"))  # clients start empty
    argv = ["run", "--model", str(tiny_model_dir), "--data-dir", str(shared_data),
            "--out", str(tmp_path / "flwr")]
    assert cli.main([*argv, *(item for pair in TINY for item in ("--set", pair))]) == 0
    shown = capfd.readouterr()
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache-embedded"))
    simulate(load_config(None, [*TINY, f"model={tiny_model_dir}", f"data_dir={shared_data}",
                                f"out={tmp_path / 'embedded'}"]))

    adapter = "adapter/adapter_model.safetensors"
    assert ((tmp_path / "flwr" / adapter).read_bytes()
            == (tmp_path / "embedded" / adapter).read_bytes())
    assert metrics_without_times(tmp_path / "flwr") == metrics_without_times(tmp_path / "embedded")
    output = shown.out + shown.err
    assert "deprecated" not in output.lower(), output
    # The server ran in a process of the SuperLink's, and its phases and rounds came back.
    for line in ("[fedsoda] pre-alignment: 2 steps in", "[fedsoda] round 2: clients 2 accepted"):
        assert line in output, output
    assert "Flower SuperLink" in (tmp_path / "flwr" / "flower.log").read_text()


def test_a_run_that_fails_in_flower_says_so_with_its_log(tiny_model_dir, shared_data, tmp_path,
                                                         monkeypatch):
    """What Flower's CLI reports (here: a federation config it refuses) ends the run with an
    error naming the log, and the SuperLink it started is gone."""
    from fedsoda.federated import flower_run

    started = []
    real_popen = flower_run.subprocess.Popen
    monkeypatch.setattr(flower_run.subprocess, "Popen",
                        lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    monkeypatch.setattr(flower_run, "federation_config", lambda cfg: "num-supernodes=two")
    cfg = load_config(None, [*TINY, f"model={tiny_model_dir}", f"data_dir={shared_data}",
                             f"out={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="the run failed; Flower's log of it: .*flower.log"):
        flower_run.run_with_flwr(cfg)
    # Other Popens may come first (a clean-clone CI once saw `file`, as platform.architecture()
    # runs it), so the SuperLink is found by its command, not by its place.
    links = [p for p in started if "flower-superlink" in str(p.args[0])]
    assert len(links) == 1 and links[0].poll() is not None, [p.args for p in started]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_the_mirror_draws_what_the_server_sent(tmp_path, monkeypatch, capsys):
    """Events written through the feed (as the server writes them) are drawn by the reader:
    phase and round lines printed once each, in order; a half-written line waits."""
    feed = tmp_path / "progress.jsonl"
    monkeypatch.setenv(progress_feed.ENV, str(feed))
    from fedsoda import phases

    mirror = phases.Mirror(feed, poll=60)  # read by hand below
    with phases.phase("teacher cache", 3, "batches") as advance:
        advance(1)
        advance(2)  # within 0.5 s of the first: not written
    progress_feed.emit("start", name="rounds", description="rounds", total=2, done=0, status="")
    progress_feed.emit("advance", name="rounds", done=1, status="s", line="[fedsoda] round 1")
    with open(feed, "a") as handle:
        handle.write('{"event": "line", "line": "[fedsoda] half')
    events = [json.loads(line)["event"] for line in feed.read_text().splitlines()[:-1]]
    assert events == ["start", "advance", "end", "line", "start", "advance"]
    mirror.read()
    assert list(mirror.tasks) == ["rounds"]  # the phase ended, the rounds bar goes on
    assert mirror.progress.tasks[0].completed == 1
    with open(feed, "a") as handle:
        handle.write(' written"}\n')
    mirror.read()
    printed = capsys.readouterr().out
    assert printed.index("teacher cache: 3 batches in") < printed.index("[fedsoda] round 1") \
        < printed.index("[fedsoda] half written")
    assert printed.count("teacher cache: 3 batches in") == 2  # the server's own print, and ours


def run_with_stand_in(stand_in, monkeypatch, model, data, out) -> tuple[int, list]:
    """`fedsoda run` on the tiny model with `flwr run` replaced by ``stand_in``: its exit code
    and the SuperLinks it started (real ones)."""
    from fedsoda.federated import flower_run

    started = []
    real_popen = flower_run.subprocess.Popen
    monkeypatch.setattr(flower_run.subprocess, "Popen",
                        lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    monkeypatch.setattr(flower_run.subprocess, "run", stand_in)
    argv = ["run", "--model", str(model), "--data-dir", str(data), "--out", str(out),
            *(x for pair in TINY for x in ("--set", pair))]
    return cli.main(argv), started


def test_ctrl_c_stops_the_superlink_and_says_how_to_go_on(tiny_model_dir, shared_data, tmp_path,
                                                          monkeypatch, capsys):
    def interrupted(*_args, **_kwargs):
        (tmp_path / "run" / "checkpoint").mkdir()  # as if a round had finished
        raise KeyboardInterrupt

    code, started = run_with_stand_in(interrupted, monkeypatch, tiny_model_dir, shared_data,
                                      tmp_path / "run")
    assert code == 130
    assert (f"interrupted; the run stopped (continue it with `fedsoda run --resume "
            f"{tmp_path / 'run'}`)") in capsys.readouterr().err
    (link,) = started
    assert link.poll() is not None


def test_sigterm_stops_the_superlink_as_ctrl_c_does(tiny_model_dir, shared_data, tmp_path,
                                                    monkeypatch, capsys):
    # `kill` or a scheduler's SIGTERM while `flwr run` streams: the same clean stop.
    from fedsoda.federated import flower_run

    def terminated(*_args, **_kwargs):
        assert signal.getsignal(signal.SIGTERM) is flower_run._interrupt  # else this kills pytest
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the run")

    before = signal.getsignal(signal.SIGTERM)  # Python's default, or Ray's after an in-process test
    code, started = run_with_stand_in(terminated, monkeypatch, tiny_model_dir, shared_data,
                                      tmp_path / "run")
    assert code == 130
    assert "it ended before its first round" in capsys.readouterr().err
    (link,) = started
    assert link.poll() is not None
    assert signal.getsignal(signal.SIGTERM) is before  # restored after the run


def test_stop_ends_processes_the_superlink_started_in_sessions_of_their_own(tmp_path):
    """Flower starts its simulation in a new session (a Ctrl-C'd run left it calibrating):
    stopping the SuperLink must end that process and what it started too."""
    from fedsoda.federated import flower_run

    pids = tmp_path / "pids"
    # A stand-in SuperLink: it starts a "simulation" in a session of its own, which starts a
    # "probe" of its own; each writes its pid and sleeps.
    script = (
        "import os, subprocess, sys, time\n"
        "if len(sys.argv) == 1:\n"
        "    subprocess.Popen([sys.executable, __file__, 'simulation'], start_new_session=True)\n"
        "elif sys.argv[1] == 'simulation':\n"
        "    subprocess.Popen([sys.executable, __file__, 'probe'])\n"
        f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
        "time.sleep(600)\n")
    (tmp_path / "link.py").write_text(script)
    link = subprocess.Popen([sys.executable, str(tmp_path / "link.py")], start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(pids.read_text().split() if pids.exists() else []) < 3:
        time.sleep(0.1)
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 3
    flower_run.stop(link)
    assert link.poll() is not None
    survivors = [pid for pid in started if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
