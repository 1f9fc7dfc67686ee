"""`fedsoda run` on Flower's supported path: a SuperLink in simulation mode and `flwr run`.

Flower 1.42 deprecates its in-process ``run_simulation``; what it supports is `flwr run APP
FEDERATION` against a SuperLink, which starts the ServerApp and Ray's virtual SuperNodes in a
process of its own. So a run here is:

1. a throw-away Flower app folder whose pyproject.toml names this package's ServerApp and
   ClientApp and holds the run's whole config as the app's run config (the installed package
   is the code; nothing else is bundled);
2. a SuperLink of our own on a free local port (``--simulation``, ``--isolation subprocess``,
   no per-run dependency installation: the app runs in this environment), its state in memory;
3. `flwr run APP local --federation-config ... --stream`, whose output (the ServerApp's and
   the clients' logs) goes to RUN/flower.log, while the server's progress comes back through
   a feed file (``fedsoda.progress_feed``) and is drawn here with the same bars as before
   (``fedsoda.phases.Mirror``).

The SuperLink and everything it started are stopped when the run ends, fails or is interrupted
(Ctrl-C, or SIGTERM from a scheduler, `timeout` or `kill`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import psutil
import tomli_w

from fedsoda import phases, progress_feed
from fedsoda.federated.config import RunConfig

BIN = Path(sys.executable).parent  # flwr and flower-superlink of this environment
FEDERATION = "local"


def run_with_flwr(cfg: RunConfig, resume: bool = False) -> dict:
    """Run ``cfg`` through a local SuperLink; returns the run's summary."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "flower.log"
    with tempfile.TemporaryDirectory(prefix="fedsoda-flwr-") as scratch:
        work = Path(scratch)
        app = write_app(work / "app", cfg, resume)
        port = free_port()
        env = flower_env(work, port)
        with open(log_path, "w") as log, terminate_as_interrupt():
            link = subprocess.Popen(
                [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation",
                 "subprocess", "--disable-runtime-dependency-installation", "--host",
                 "127.0.0.1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                print(f"[fedsoda] Flower's log of this run: {log_path}", flush=True)
                wait_listening(port, link, log_path)
                with phases.Mirror(Path(env[progress_feed.ENV])):
                    code = subprocess.run(
                        [str(BIN / "flwr"), "run", str(app), FEDERATION, "--stream",
                         "--federation-config", federation_config(cfg)],
                        stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            except KeyboardInterrupt:
                again = (f"continue it with `fedsoda run --resume {out}`"
                         if (out / "checkpoint").exists() else "it ended before its first round")
                raise KeyboardInterrupt(f"interrupted; the run stopped ({again})") from None
            finally:
                stop(link)
    summary = out / "summary.json"
    if code != 0 or not summary.is_file() or failed(log_path):
        raise RuntimeError(f"the run failed; Flower's log of it: {log_path}\n"
                           + tail(log_path))
    return json.loads(summary.read_text())


@contextmanager
def terminate_as_interrupt():
    """SIGTERM ends the run as Ctrl-C does. Python's default is to die at once, skipping the
    cleanup below, and the SuperLink's simulation (a session of its own) then trains on and
    writes to the run folder beside whatever runs next. Signals reach the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def write_app(folder: Path, cfg: RunConfig, resume: bool) -> Path:
    """A Flower app whose run config is ``cfg`` (and ``resume``), running this package."""
    folder.mkdir()
    project = {
        "project": {"name": "fedsoda-run", "version": version("fedsoda"),
                    "description": "a fedsoda run", "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedsoda",
            "components": {"serverapp": "fedsoda.federated.server_app:app",
                           "clientapp": "fedsoda.federated.client_app:app"},
            "config": {**cfg.to_dict(), "resume": resume}}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def federation_config(cfg: RunConfig) -> str:
    """The simulation's size and Ray resources (client_cpus, client_gpus, sim_cpus)."""
    return (f"num-supernodes={cfg.clients} client-resources-num-cpus={cfg.client_cpus} "
            f"client-resources-num-gpus={cfg.client_gpus} init-args-num-cpus={cfg.sim_cpus} "
            f"init-args-num-gpus={1 if cfg.client_gpus else 0} init-args-log-to-driver=true")


def flower_env(work: Path, port: int) -> dict:
    """A Flower home of this run's own (its SuperLink connection) and the progress feed."""
    home = work / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            progress_feed.ENV: str(work / "progress.jsonl")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, link: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if link.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with code {link.returncode}; its log: "
                               f"{log}\n{tail(log)}")
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink does not listen on port {port} after {seconds:.0f} s; "
                       f"its log: {log}")


def stop(link: subprocess.Popen) -> None:
    """The SuperLink and every process under it: TERM, then KILL what is left after 30 s.

    Flower starts the simulation process in a session of its own, and it starts Ray and
    fedsoda's memory probes, so TERM to the SuperLink's process group alone left a simulation
    busy calibrating for minutes after Ctrl-C. The tree is read before anything is killed
    (an orphan's parent is gone) and again before KILL (children started meanwhile)."""
    family = _tree(link.pid)
    for process in family:
        _signal(process, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=30)
    alive += [child for process in alive for child in _tree(process.pid)[1:] if child not in alive]
    for process in alive:
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=10)
    link.poll()  # reaps the SuperLink


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants, as they are now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, sig: int) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def failed(log: Path) -> bool:
    """Flower's CLI may exit 0 after a run that failed; its log says so."""
    text = log.read_text(errors="replace")
    return "raised an exception" in text or "Simulation failed" in text


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
