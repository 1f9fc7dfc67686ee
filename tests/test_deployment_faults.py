"""Faults on Flower's deployment engine (scripts/deploy_local.sh, a tiny random model): a
SuperNode SIGKILLed in the middle of a run (the server waits for it only until the round's
deadline, logs it as silent, and the run finishes with the others); the SuperLink and the
ServerApp SIGKILLed after round 2 and the run restarted with `resume=true` (the final adapter
is the one an uninterrupted run gives, bit for bit).

Slow (minutes: every message starts a fresh ClientApp process), so not in CI.
"""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedsoda.federated.config import load_config
from fedsoda.federated.simulation import simulate
from test_deployment import SCRIPT, TINY

ADAPTER = Path("adapter") / "adapter_model.safetensors"


def wait_for(condition, seconds: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"deploy_local ended early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds} s in vain:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def rounds_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def start_deployment(work: Path, log: Path, settings: list[str]) -> subprocess.Popen:
    command = ["bash", str(SCRIPT), "--workdir", str(work), "--timeout", "1500", *settings]
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, "FEDSODA_DATA_DIR": ""})


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process under it (the SuperLink starts the ServerApp's process)."""
    found = [pid]
    for line in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                               text=True).stdout.split():
        found += process_tree(int(line))
    return found


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_waited_for_only_until_the_deadline(tiny_model_dir,
                                                                         shared_data, tmp_path):
    work, log = tmp_path / "deploy", tmp_path / "deploy.log"
    settings = [pair for pair in TINY if not pair.startswith("rounds=")]
    process = start_deployment(work, log, [
        "--nodes", "3", f"model={tiny_model_dir}", f"data_dir={shared_data}", *settings,
        "rounds=3", "round_timeout=60", "min_replies=1"])
    metrics = work / "run" / "metrics.jsonl"
    try:
        wait_for(lambda: rounds_done(metrics) >= 1, 1200, process, log)
        # Round 2's messages go out as soon as round 1 is checkpointed: the node dies in it.
        (pid,) = re.findall(r"SuperNode 2 \(partition 2 of 3\) on \S+ \(pid (\d+)\)", log.read_text())
        os.kill(int(pid), signal.SIGKILL)
        process.wait(timeout=1500)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["rejected"] == []
    for entry in rounds[1:]:  # every later round: client 2 dropped once, the others accepted
        assert [r["client"] for r in entry["rejected"]] == [2], entry["rejected"]
        # Whichever comes first: the deadline, or the SuperLink's error for a node whose
        # heartbeat stopped (it used to be logged as client -1, and the client as silent too).
        reason = entry["rejected"][0]["reason"]
        assert "no reply within round_timeout=60 s" in reason or "Node Unavailable" in reason
        assert entry["seconds"] < 60 + 30  # the round did not wait beyond its deadline
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["accuracy"] is not None


@pytest.mark.slow
def test_a_superlink_killed_after_round_2_resumes_to_the_adapter_of_an_uninterrupted_run(
        tiny_model_dir, shared_data, tmp_path, monkeypatch):
    settings = [pair for pair in TINY if not pair.startswith("rounds=")]
    settings += [f"model={tiny_model_dir}", f"data_dir={shared_data}", "rounds=3"]
    # The uninterrupted reference: the same config in Flower's simulation engine (the
    # deployment engine gives the simulation's adapter bit for bit: tests/test_flwr_run.py).
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache-straight"))
    simulate(load_config(None, [*settings, "clients=2", "clients_per_round=2",
                                f"out={tmp_path / 'straight'}"]))

    work, run = tmp_path / "deploy", tmp_path / "deploy" / "run"
    settings = ["--nodes", "2", *settings, f"out={run}"]
    first = start_deployment(work, tmp_path / "first.log", settings)
    try:
        wait_for(lambda: rounds_done(run / "metrics.jsonl") >= 2, 1200, first, tmp_path / "first.log")
        (pid,) = re.findall(r"SuperLink on \S+ \(pid (\d+)\)", (tmp_path / "first.log").read_text())
        for each in process_tree(int(pid)):  # the server's machine dies: SuperLink and ServerApp
            os.kill(each, signal.SIGKILL)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.terminate()
            first.wait(timeout=60)
    assert first.returncode != 0
    assert not (run / "summary.json").exists()

    # The SuperNodes' devices keep their disks (the same work folder); a new SuperLink.
    second = start_deployment(work, tmp_path / "second.log", [*settings, "resume=true"])
    second.wait(timeout=1500)
    output = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, output[-4000:]
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert (run / ADAPTER).read_bytes() == (tmp_path / "straight" / ADAPTER).read_bytes()
