"""The same ServerApp and ClientApp in Flower's simulation engine, in this process.

`fedsoda run` and `fedsoda compare` go through Flower's supported path (a SuperLink and
`flwr run`: ``fedsoda.federated.flower_run``), where the ClientApp is the package's. This
in-process engine, on Flower's ``run_simulation`` (deprecated in Flower 1.42, kept while flwr
is pinned), is for the tests that hand the server a ClientApp of their own (faults, bad
replies, recorded messages) and for benchmarks; tests check that both give the same adapter.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedsoda.federated.client_app import app as client_app
from fedsoda.federated.config import RunConfig
from fedsoda.federated.server_app import run_server


def simulate(cfg: RunConfig, resume: bool = False, clients: ClientApp = client_app) -> dict:
    """Run ``cfg`` with ``cfg.clients`` virtual SuperNodes on this machine; returns the summary."""
    summary: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summary.update(run_server(grid, cfg, resume))

    logging.getLogger("flwr").setLevel(logging.WARNING)
    run_simulation(
        server_app=server_app, client_app=clients, num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": cfg.client_cpus,
                                             "num_gpus": cfg.client_gpus},
                        "init_args": {"num_cpus": cfg.sim_cpus,
                                      "num_gpus": 1 if cfg.client_gpus else 0,
                                      "log_to_driver": True, "include_dashboard": False}})
    if not summary:
        raise RuntimeError("the simulation ended without a summary; see the log above")
    return summary
