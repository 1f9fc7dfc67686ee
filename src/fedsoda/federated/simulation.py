"""The embedded default: the same ServerApp and ClientApp in Flower's simulation engine."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedsoda.federated.client_app import app as client_app
from fedsoda.federated.config import RunConfig
from fedsoda.federated.server_app import run_server


def simulate(cfg: RunConfig, resume: bool = False, parallel_clients: int = 2,
             clients: ClientApp = client_app) -> dict:
    """Run ``cfg`` with ``cfg.clients`` virtual SuperNodes on this machine; returns the summary."""
    summary: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summary.update(run_server(grid, cfg, resume))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server_app, client_app=clients, num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": parallel_clients, "num_gpus": 0,
                                      "log_to_driver": True, "include_dashboard": False}})
    if not summary:
        raise RuntimeError("the simulation ended without a summary; see the log above")
    return summary
