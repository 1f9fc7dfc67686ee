"""scripts/deploy_local.sh --tls: TLS and SuperNode authentication in the shipped path. A run
over TLS with registered SuperNodes gives the metrics and adapter of the insecure run; a
SuperNode whose key is not registered is refused, and one without TLS cannot connect.

Slow (two deployments of the tiny model, a few minutes each on a 2-core machine), not in CI.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repro import adapter_hash, metrics_hash

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "deploy_local.sh"
BIN = Path(sys.executable).parent
TINY = ["rounds=2", "realign_every=1", "eval_every=1", "local_steps=2", "batch_size=4",
        "lr=1e-3", "max_tokens=48", "eval_limit=16", "prune.n=2", "prune.p=2",
        "prune.adapter_layers=2", "prune.samples=8", "prune.seq_len=32", "align.samples=16",
        "align.heldout=8", "align.seq_len=32", "align.batch_size=8", "align.realign_samples=8"]


def deploy(work: Path, model: Path, data: Path, *flags: str) -> Path:
    done = subprocess.run(["bash", str(SCRIPT), "--workdir", str(work), "--timeout", "900",
                           *flags, f"model={model}", f"data_dir={data}", *TINY],
                          capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "finished:completed" in output, output[-4000:]
    return work / "run"


@pytest.mark.slow
def test_a_tls_run_with_registered_supernodes_matches_the_insecure_run(tiny_model_dir, shared_data,
                                                                        tmp_path):
    secure = deploy(tmp_path / "tls", tiny_model_dir, shared_data, "--tls")
    plain = deploy(tmp_path / "plain", tiny_model_dir, shared_data)
    assert (adapter_hash(secure), metrics_hash(secure)) == (adapter_hash(plain), metrics_hash(plain))
    register_log = (tmp_path / "tls" / "logs" / "register.log").read_text()
    assert register_log.count("registered") >= 2 or "ID" in register_log, register_log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_an_unregistered_or_insecure_supernode_is_refused(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tls_material.py"), str(tmp_path), "1"],
                   check=True)
    port = free_port()
    # The SuperLink starts flower-superexec by name.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "link"), "PATH": path}
    link = subprocess.Popen(
        [BIN / "flower-superlink", "--ssl-ca-certfile", tmp_path / "ca.crt", "--ssl-certfile",
         tmp_path / "server.pem", "--ssl-keyfile", tmp_path / "server.key",
         "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(tmp_path / "link.log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)

        def supernode(name: str, *security: str) -> tuple[int | None, str]:
            """Its exit code (None: still running after 120 s) and its log. Output goes to a
            file: a process it starts keeps inherited pipes open after it exits."""
            node_env = {**env, "FLWR_HOME": str(tmp_path / name)}
            with open(tmp_path / f"{name}.log", "w") as log:
                node = subprocess.Popen(
                    [BIN / "flower-supernode", *security, "--superlink", f"127.0.0.1:{port}",
                     "--host", "127.0.0.1", "--port", str(free_port()),
                     "--node-config", "partition-id=0 num-partitions=1"],
                    env=node_env, stdout=log, stderr=subprocess.STDOUT)
                try:
                    code = node.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    node.kill()
                    node.wait()
                    code = None
            return code, (tmp_path / f"{name}.log").read_text()

        # The key pair exists but was never registered with `flwr supernode register`.
        code, log = supernode("unregistered", "--root-certificates", str(tmp_path / "ca.crt"),
                              "--auth-supernode-private-key", str(tmp_path / "node-0"))
        assert code not in (None, 0) and "305" in log, log[-2000:]  # Flower's "not authorized"
        assert "No SuperNode found with the given public key" in (tmp_path / "link.log").read_text()
        # Without TLS it never gets through the handshake: it retries until it is stopped.
        code, log = supernode("insecure", "--insecure")
        assert code != 0, log[-2000:]
    finally:
        link.terminate()
        link.wait(timeout=30)
