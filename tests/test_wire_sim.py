"""A quantized wire end to end in Flower's simulation engine on a tiny random model: bytes in
metrics.jsonl are the hand-counted sizes of what was sent."""

import json
import sys

from ray import cloudpickle
from safetensors.torch import load_file

from fedsoda.federated.simulation import simulate
from fedsoda.wire import WireSettings
from test_federated_sim import tiny_config

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nf4_bytes(tensors) -> int:
    """Codes at two values a byte (an odd one takes a byte) plus a float32 absmax for every
    block of 64, counted by hand for each tensor."""
    return sum((t.numel() + 1) // 2 + 4 * -(-t.numel() // 64) for t in tensors)


def test_nf4_wire_bytes_are_the_sizes_of_codes_and_block_scales(tiny_model_dir, shared_data,
                                                                  tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    summary = simulate(tiny_config(tiny_model_dir, shared_data, out, wire=WireSettings("nf4")))
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    adapter = load_file(str(out / "checkpoint" / "adapter.safetensors"))
    emulator = load_file(str(out / "checkpoint" / "emulator.safetensors"))
    assert [r["rejected"] for r in rounds] == [[], []]
    assert rounds[0]["bytes_up"] == rounds[0]["bytes_down"] == 2 * nf4_bytes(adapter.values())
    # Round 2: the emulator LoRA, new after round 1's realignment, goes down in NF4 too.
    assert rounds[1]["bytes_down"] == 2 * (nf4_bytes(adapter.values()) + nf4_bytes(emulator.values()))
    assert rounds[1]["params_up"] == 2 * sum(t.numel() for t in adapter.values())  # values, not bytes
    # The server's broadcast residual is checkpointed, one per adapter tensor.
    residual = load_file(str(out / "checkpoint" / "wire_residual.safetensors"))
    assert sorted(residual) == sorted(f"global/{k}" for k in adapter)
    assert summary["accuracy"] is not None
    assert summary["comm_bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] for r in rounds)
