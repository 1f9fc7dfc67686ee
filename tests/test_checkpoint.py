"""Checkpoints survive crashes at any instant and damaged files: a manifest of sha256 sums,
fsynced writes, the previous checkpoint as the fallback."""

import json
import logging
import os

import pytest
import torch

from fedsoda.federated.checkpoint import (
    CheckpointError,
    ServerState,
    load_checkpoint,
    save_checkpoint,
)


def state(round_number: int) -> ServerState:
    return ServerState(round=round_number, adapter={"w": torch.full((64,), float(round_number))},
                       emulator={"e": torch.zeros(3)},
                       metrics=[{"round": r} for r in range(1, round_number + 1)])


@pytest.fixture
def two_rounds(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(state(1), folder)
    save_checkpoint(state(2), folder)
    return folder


def test_the_manifest_lists_every_file_and_the_previous_checkpoint_is_kept(two_rounds):
    manifest = json.loads((two_rounds / "manifest.json").read_text())
    assert sorted(manifest) == ["adapter.safetensors", "emulator.safetensors", "state.json"]
    assert load_checkpoint(two_rounds).round == 2
    assert load_checkpoint(two_rounds.with_name("checkpoint.prev")).round == 1
    assert not two_rounds.with_name("checkpoint.tmp").exists()


def damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def damage_flip(path):
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one float of the adapter
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (damage_truncate, "bytes, the manifest says"),
    (damage_flip, "does not match its sha256"),
    (lambda path: path.unlink(), "is missing"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(
        two_rounds, damage, message, caplog):
    damage(two_rounds / "adapter.safetensors")
    with caplog.at_level(logging.WARNING, logger="fedsoda.server"):
        loaded = load_checkpoint(two_rounds)
    assert loaded.round == 1 and torch.equal(loaded.adapter["w"], torch.full((64,), 1.0))
    assert message in caplog.text and "resuming from" in caplog.text


def test_when_both_are_damaged_the_error_is_one_line_naming_each(two_rounds):
    damage_flip(two_rounds / "adapter.safetensors")
    damage_truncate(two_rounds.with_name("checkpoint.prev") / "state.json")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(two_rounds)
    text = str(error.value)
    assert "\n" not in text and "checkpoint: " in text and "checkpoint.prev: " in text
    assert "--overwrite" in text


def test_a_crash_between_the_renames_leaves_a_checkpoint_to_resume(two_rounds, monkeypatch):
    from fedsoda.federated import checkpoint

    real = os.replace

    def crash_before_the_new_one_is_swapped_in(src, dst):
        if str(dst) == str(two_rounds):
            raise KeyboardInterrupt  # the process dies after the live one became .prev
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_before_the_new_one_is_swapped_in)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(state(3), two_rounds)
    monkeypatch.setattr(checkpoint.os, "replace", real)
    assert not two_rounds.exists()
    assert load_checkpoint(two_rounds).round == 2  # round 3 is played again
    save_checkpoint(state(3), two_rounds)  # and the next save goes on from there
    assert load_checkpoint(two_rounds).round == 3


def test_an_older_fedsodas_leftover_checkpoint_old_no_longer_blocks_saving(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(state(1), folder)
    (folder.with_name("checkpoint.old")).mkdir()
    (folder.with_name("checkpoint.old") / "adapter.safetensors").write_bytes(b"x")
    save_checkpoint(state(2), folder)  # before: "Directory not empty" on every later save
    assert load_checkpoint(folder).round == 2 and not folder.with_name("checkpoint.old").exists()


def test_a_checkpoint_written_before_manifests_still_loads(two_rounds):
    (two_rounds / "manifest.json").unlink()
    assert load_checkpoint(two_rounds).round == 2


def test_no_checkpoint_at_all_says_there_is_nothing_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        load_checkpoint(tmp_path / "checkpoint")
