"""Pieces of the runtime: config, FedAvg, screening, what goes on the wire, checkpoints."""

import io

import numpy as np
import pytest
import torch

from fedsoda.federated.checkpoint import ServerState, load_checkpoint, save_checkpoint
from fedsoda.federated.config import RunConfig, config_from_flat, load_config
from fedsoda.federated.messages import (
    files_record,
    from_record,
    record_bytes,
    record_params,
    to_record,
    write_files,
)
from fedsoda.federated.screening import client_error, screen_update
from fedsoda.training import proximal_term

EXPECTED = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}


def test_proximal_term_by_hand():
    params = {"w": torch.tensor([1.0, 2.0])}
    assert proximal_term(params, {"w": torch.tensor([0.0, 4.0])}).item() == 1.0 + 4.0


@pytest.mark.parametrize("update, count, reason", [
    ({"a": torch.zeros(2, 3), "b": torch.full((4,), float("nan"))}, 5, "non-finite"),
    ({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, 5, "shape"),
    ({"a": torch.zeros(2, 3)}, 5, "keys differ"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, 5, "keys differ"),
    ({"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4)}, 5, "dtype"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, 10_000, "outside 1..100"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, 0, "outside"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, 2.5, "outside"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, float("inf"), "not a number"),
])
def test_screening_rejects(update, count, reason):
    assert reason in screen_update(update, EXPECTED, count, max_examples=100)


def test_screening_accepts_sound_update():
    assert screen_update({"a": torch.ones(2, 3), "b": torch.ones(4)}, EXPECTED, 7, 100) is None


def test_record_bytes_equal_serialized_tensor_sizes():
    state = {"x": torch.randn(8, 16), "y": torch.randn(3)}
    record = to_record(state)
    assert record_params(record) == 8 * 16 + 3
    # Each array is sent as a .npy blob: the float32 payload plus numpy's header.
    expected = 0
    for tensor in state.values():
        buffer = io.BytesIO()
        np.save(buffer, tensor.numpy(), allow_pickle=False)
        expected += len(buffer.getvalue())
    assert record_bytes(record) == expected
    assert all(torch.equal(from_record(record)[k], v) for k, v in state.items())


def test_files_round_trip(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"a": 1}')
    (tmp_path / "src" / "w.bin").write_bytes(bytes(range(256)) * 3)
    record = files_record(tmp_path / "src")
    assert record_bytes(record) >= 768 + 8
    write_files(record, tmp_path / "dst")
    assert (tmp_path / "dst" / "w.bin").read_bytes() == bytes(range(256)) * 3


def test_config_layers_and_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('# fedsoda run c.toml\nrounds = 3\n[align]\nlr = 0.01\n')
    cfg = load_config(path, ["align.alpha=0.5", "clients=4"], clients_per_round=2)
    assert (cfg.rounds, cfg.clients, cfg.clients_per_round) == (3, 4, 2)
    assert (cfg.align.lr, cfg.align.alpha) == (0.01, 0.5)
    assert config_from_flat({"prune.n": 2, "rounds": 5}).prune.n == 2
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["align.nope=1"])
    with pytest.raises(ValueError, match="clients_per_round"):
        RunConfig(clients=2, clients_per_round=3)
    with pytest.raises(ValueError, match="dirichlet"):
        RunConfig(partition="dirichlet:-1")
    with pytest.raises(ValueError, match="n .*must be >= 1"):
        load_config(None, ["prune.n=0"])


def test_checkpoint_round_trip(tmp_path):
    state = ServerState(round=2, adapter={"w": torch.ones(2)}, emulator={"e": torch.zeros(3)},
                        emulator_version=1, holders={"0": 1}, metrics=[{"round": 1}, {"round": 2}])
    save_checkpoint(state, tmp_path / "ck")
    save_checkpoint(state, tmp_path / "ck")  # overwriting keeps a complete folder
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.round == 2 and loaded.holders == {"0": 1} and len(loaded.metrics) == 2
    assert torch.equal(loaded.adapter["w"], state.adapter["w"])
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "none")


def test_shipped_configs_open_with_their_command_and_parse():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        first = path.read_text().splitlines()[0]
        command = f"configs/{path.name}"
        assert any(first == f"# fedsoda {verb} {command}" or first.startswith(f"# fedsoda {verb} {command} ")
                   for verb in ("run", "compare")), first
        load_config(path)


def test_quick_flag_equals_the_quick_config():
    from pathlib import Path

    from fedsoda.commands.run import QUICK

    path = Path(__file__).resolve().parents[1] / "configs" / "quick.toml"
    assert load_config(None, QUICK + ["out=runs/quick"]) == load_config(path)


def test_a_client_error_is_kept_as_its_message_line():
    # What Flower's simulation hands the server when a client raises (abridged from a run).
    wrapped = ("802e4acbb7c18e301000000, repr=<flwr.simulation.ray_transport.ray_actor."
               "ClientAppActor object at 0x7fd3483d7a90>)\n           ^^^^^^\n  File \"/x/ray_actor.py"
               "\", line 65, in run\n    raise ClientAppException(str(ex)) from ex\nflwr.clientapp."
               "client_app.ClientAppException: \nException ClientAppException occurred. Message: "
               "a client with no examples cannot train'>")
    assert client_error(wrapped) == "client error: a client with no examples cannot train"
    assert client_error("node 3 timed out\n after 60 s") == "client error: node 3 timed out after 60 s"
