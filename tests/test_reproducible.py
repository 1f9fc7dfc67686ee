"""`fedsoda run --quick` of every method gives the adapter and metrics pinned before the
heterogeneous-client runtime replaced the old one (issue 14), bit for bit.

The hashes were taken with the code before that refactor (commit 530158e, after the fix
that made FedSODA reproducible run to run), on this project's CPU machines. Float results
depend on the CPU's kernels, so the pins hold only where torch reports the same CPU
capability; elsewhere the test says so and skips.
"""

import shutil

import pytest
import torch

from fedsoda.cli import main
from fedsoda.models import cache_dir
from repro import adapter_hash, metrics_hash

PINNED_CAPABILITY = "AVX512"
PINNED = {  # method: (adapter hash, metrics hash without wall-clock seconds)
    "fedsoda": ("afbf3e405e813cae", "4de79a9d43567387"),
    "fedpetuning": ("8d490e9c93cbb4bd", "d3c1ee7257033bd9"),
    "fedot": ("0693d154e2a19971", "9a9d66de547f6e55"),
    "fedbiot": ("0382fff050a3b0aa", "94e7230b101f7047"),
}


# Not in CI: from a clean clone with a fresh venv (bash .ci/run, 2026-12-02) FedSODA, FedOT and
# FedBiOT gave other hashes than this checkout's venv gives (FedPETuning matched); the cause,
# something in pruning or alignment that differs between the two environments, is not found.
@pytest.mark.slow
@pytest.mark.parametrize("method", list(PINNED))
def test_quick_run_matches_the_pinned_adapter_and_metrics(method, shared_data, tmp_path):
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != PINNED_CAPABILITY:
        pytest.skip(f"hashes pinned on a {PINNED_CAPABILITY} CPU; this one is {capability}")
    # Clients start empty, as when the hashes were pinned (the one-time download is a metric).
    shutil.rmtree(cache_dir() / "clients", ignore_errors=True)
    out = tmp_path / method
    assert main(["run", "--quick", "--method", method, "--data-dir", str(shared_data),
                 "--out", str(out)]) == 0
    assert (adapter_hash(out), metrics_hash(out)) == PINNED[method]
