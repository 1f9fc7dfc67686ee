"""Flower's deployment engine end to end: scripts/deploy_local.sh starts a SuperLink and two
SuperNodes, `flwr run`s the app on a tiny random model, checks the run folder and stops
everything it started.

That test is slow (about 4 minutes on a busy 2-core machine: every message starts a fresh
ClientApp process that imports torch and transformers), so it does not run in CI; the check
that pyproject.toml's Flower run config matches ``RunConfig`` is fast.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedsoda.federated.config import RunConfig, config_from_flat, with_method_schedule

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "deploy_local.sh"

TINY = ["rounds=2", "realign_every=1", "eval_every=1", "local_steps=2", "batch_size=4",
        "lr=1e-3", "max_tokens=48", "eval_limit=16", "prune.n=2", "prune.p=2",
        "prune.adapter_layers=2", "prune.samples=8", "prune.seq_len=32", "align.samples=16",
        "align.heldout=8", "align.seq_len=32", "align.batch_size=8", "align.realign_samples=8"]


def test_flower_run_config_lists_every_run_config_key_with_its_default():
    # `flwr run --run-config` may only override keys listed in [tool.flwr.app.config]; a key
    # added to RunConfig must be added there too (TOML-typed, nested ones as `prune.x`).
    with open(ROOT / "pyproject.toml", "rb") as handle:
        app = tomllib.load(handle)["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedsoda.federated.server_app:app",
                                 "clientapp": "fedsoda.federated.client_app:app"}
    flat = flatten_dict(app["config"])  # what the ServerApp gets as context.run_config
    assert flat.pop("resume") is False  # the one run-level key: continue the run in `out`
    defaults = {}
    for name, value in RunConfig().to_dict().items():
        if isinstance(value, dict):
            defaults.update({f"{name}.{key}": inner for key, inner in value.items()})
        else:
            defaults[name] = value
    assert flat == defaults
    assert {key: type(value) for key, value in flat.items()} == {
        key: type(value) for key, value in defaults.items()}
    assert config_from_flat(flat) == with_method_schedule(RunConfig())
    assert {f.name for f in dataclasses.fields(RunConfig)} >= {key.split(".")[0] for key in flat}


def own_data(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Each SuperNode's own SST-2 file (40 and 24 rows), and the server's data folder: the
    validation split and public WikiText-2 (validation, test) only, no training data at all,
    so a server that read clients' data would fail."""
    rows = (shared_data / "sst2" / "train.jsonl").read_text().splitlines()
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    for k, (start, count) in enumerate(((0, 40), (1000, 24))):
        (nodes / f"client-{k}.jsonl").write_text("\n".join(rows[start:start + count]) + "\n")
    server = tmp_path / "server-data"
    for name in ("sst2/validation.jsonl", "wikitext2/validation.jsonl", "wikitext2/test.jsonl"):
        (server / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / name, server / name)
    return nodes, server


@pytest.mark.slow
def test_two_supernodes_with_their_own_data_write_the_run_folder(tiny_model_dir, shared_data,
                                                                 tmp_path):
    work = tmp_path / "deploy"
    nodes, server_data = own_data(shared_data, tmp_path)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--workdir", str(work), "--timeout", "900",
         "--node-data", str(nodes / "client-{k}.jsonl"),
         f"model={tiny_model_dir}", f"data_dir={server_data}", *TINY],
        capture_output=True, text=True, timeout=1200, env={**os.environ, "FEDSODA_DATA_DIR": ""})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "finished:completed" in output

    out = work / "run"  # the script's default `out`
    for name in ("config.toml", "plan.json", "metrics.jsonl", "summary.json", "curve.png",
                 "adapter/adapter_config.json", "align.json", "subllm/model/config.json",
                 "checkpoint/adapter.safetensors"):
        assert (out / name).exists(), name
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["realigned"] and not rounds[1]["realigned"]
    assert all(r["rejected"] == [] for r in rounds)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clients"] == 2 and summary["rounds"] == 2
    assert summary["submodel_download_bytes"] > 0 and summary["accuracy"] is not None
    # Overrides of nested keys reached the ServerApp (all in one --run-config string).
    plan = json.loads((out / "plan.json").read_text())
    assert plan["n"] == 2 and plan["p"] == 2 and plan["adapter_layers"] == 2

    # Each client declared the examples of its own file; the server read none of them (it has
    # no training data), yet every reply passed the example-count bound.
    declared = json.loads((out / "clients.json").read_text())
    assert {k: v["examples"] for k, v in declared.items()} == {"0": 40, "1": 24}
    # Each SuperNode kept the files it received in its own storage (its FEDSODA_CACHE).
    for k in (0, 1):
        storage = work / f"node-{k}" / "cache" / "clients" / f"client-{k}"
        assert len(list(storage.glob("models/*/config.json"))) == 1, k
        assert len(list(storage.glob("blobs/*"))) == len(list((out / "subllm" / "model").iterdir()))

    # Every process the script started is gone.
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", output)]
    assert len(pids) == 3
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_deployment_servers_resume_key_reaches_the_run(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from fedsoda.federated import server_app

    calls = []
    monkeypatch.setattr(server_app, "run_server", lambda grid, cfg, resume=False: calls.append((cfg, resume)))
    values = {"resume": True, "out": str(tmp_path / "run"), "rounds": 3}
    server_app.main(None, SimpleNamespace(run_config=values))
    (cfg, resume), = calls
    assert resume and cfg.out == str(tmp_path / "run") and cfg.rounds == 3
    with pytest.raises(ValueError, match="'resume' must be true or false"):
        server_app.main(None, SimpleNamespace(run_config={"resume": "yes"}))
