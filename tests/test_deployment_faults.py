"""Faults on Flower's deployment engine (scripts/deploy_local.sh, a tiny random model): a
SuperNode SIGKILLed in the middle of a run. The server waits for it only until the round's
deadline, logs it as silent, and the run finishes with the others.

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

from test_deployment import SCRIPT, TINY


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


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_waited_for_only_until_the_deadline(tiny_model_dir,
                                                                         shared_data, tmp_path):
    work, log = tmp_path / "deploy", tmp_path / "deploy.log"
    settings = [pair for pair in TINY if not pair.startswith("rounds=")]
    command = ["bash", str(SCRIPT), "--workdir", str(work), "--timeout", "1500", "--nodes", "3",
               f"model={tiny_model_dir}", f"data_dir={shared_data}", *settings, "rounds=3",
               "round_timeout=60", "min_replies=1"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "FEDSODA_DATA_DIR": ""})
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
    for entry in rounds[1:]:  # every later round: client 2 silent, the others accepted
        assert [r["client"] for r in entry["rejected"]] == [2], entry["rejected"]
        assert "no reply within round_timeout=60 s" in entry["rejected"][0]["reason"]
        assert entry["seconds"] >= 60  # the round waited for its deadline, not longer
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["accuracy"] is not None
