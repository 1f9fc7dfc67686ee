"""`flwr run .`, Flower's own entry point, on a local simulation federation: the repository's
app (pyproject.toml's [tool.flwr.app]) run by a SuperLink in simulation mode gives the
adapter, bit for bit, and the metrics that the embedded default (`fedsoda run`'s in-process
simulation) gives for the same config.

The SuperLink is started here, as `flwr run` would start its managed local one, but without
installing the app's dependencies into a fresh environment per run (the managed one runs
`uv sync` for that: 40 s and a second copy of torch). Slow (a minute or two of process
starts), so not in CI.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import tomli_w

from fedsoda.federated.config import load_config
from fedsoda.federated.flower_run import free_port, wait_listening
from fedsoda.federated.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
TINY = ["clients=2", "clients_per_round=2", "rounds=2", "realign_every=1", "eval_every=1",
        "local_steps=2", "batch_size=4", "lr=1e-3", "max_tokens=48", "eval_limit=16",
        "prune.n=2", "prune.p=2", "prune.adapter_layers=2", "prune.samples=8", "prune.seq_len=32",
        "align.samples=16", "align.heldout=8", "align.seq_len=32", "align.batch_size=8",
        "align.realign_samples=8", "tensorboard=false"]


def flower_deprecations(output: str) -> list[str]:
    return [line for line in output.lower().splitlines() if "deprecat" in line
            and any(name in line for name in ("flwr", "flower", "run_simulation", "superlink"))]


def metrics_without_times(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.slow
def test_flwr_run_gives_the_adapter_the_embedded_default_gives(tiny_model_dir, shared_data,
                                                               tmp_path, monkeypatch):
    overrides = [*TINY, f"model={tiny_model_dir}", f"data_dir={shared_data}"]
    embedded = load_config(None, [*overrides, f"out={tmp_path / 'embedded'}"])
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache-embedded"))  # clients start empty
    simulate(embedded)

    home, port, log = tmp_path / "flwr-home", free_port(), tmp_path / "superlink.log"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n")
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "FEDSODA_CACHE": str(tmp_path / "cache-flwr")}
    flower = load_config(None, [*overrides, f"out={tmp_path / 'flwr'}"])
    run_toml = tmp_path / "run.toml"  # `--run-config FILE.toml`: every key, nested as tables
    run_toml.write_text(tomli_w.dumps(flower.to_dict()))
    with open(log, "w") as handle:
        link = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation",
             "subprocess", "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(port), "--database", str(tmp_path / "state.db")],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_listening(port, link, log)
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "sim", "--run-config", str(run_toml),
             "--federation-config", "num-supernodes=2", "--stream"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    finally:
        os.killpg(link.pid, 15)
        link.wait(timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert (tmp_path / "flwr" / "summary.json").exists(), output[-4000:]
    # Flower warns of nothing deprecated (torch and transformers print deprecations of their own).
    assert flower_deprecations(output) == [], output

    adapter = "adapter/adapter_model.safetensors"
    assert ((tmp_path / "flwr" / adapter).read_bytes()
            == (tmp_path / "embedded" / adapter).read_bytes())
    assert metrics_without_times(tmp_path / "flwr") == metrics_without_times(tmp_path / "embedded")
