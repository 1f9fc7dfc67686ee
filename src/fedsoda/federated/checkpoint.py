"""Server state after each round, written so that a crash at any instant, or a damaged file,
never costs more than the round in progress.

A checkpoint is a folder: the tensors as safetensors, the rest as ``state.json``, and
``manifest.json`` with every file's sha256 and size. It is written beside the live one
(``checkpoint.tmp``), each file and the folder fsynced, then swapped in with renames; the
checkpoint it replaces is kept as ``checkpoint.prev``. Loading verifies the manifest and falls
back to ``checkpoint.prev`` (with a warning) when the latest is missing, truncated or altered;
a crash between the renames leaves one of the two intact, whichever instant it hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger("fedsoda.server")
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be trusted (one line: which file, what is wrong)."""


@dataclass
class ServerState:
    """Everything the round loop needs to continue where it stopped."""

    round: int = 0
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # global adapter LoRA
    emulator: dict[str, torch.Tensor] = field(default_factory=dict)  # current emulator LoRA
    emulator_version: int = 0  # bumped at every realignment
    holders: dict[str, int] = field(default_factory=dict)  # node id -> emulator version held
    metrics: list[dict] = field(default_factory=list)  # one entry per finished round
    method: dict = field(default_factory=dict)  # what the method keeps between rounds (JSON)
    # Mid-round tensors (HierFedLoRA's group LoRA between intra-group rounds), so a run
    # stopped inside a global round resumes there; empty between rounds.
    partial: dict[str, torch.Tensor] = field(default_factory=dict)
    # The server's broadcast rounding residuals (quantized wire with error feedback down),
    # named "scope/tensor"; empty for fp32.
    wire_residual: dict[str, torch.Tensor] = field(default_factory=dict)
    # Updates each client sent (client id -> count): what differential privacy accounts.
    releases: dict[str, int] = field(default_factory=dict)


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to the disk (a folder: its renames and new names)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write(state: ServerState, tmp: Path) -> None:
    """Every file of the checkpoint into ``tmp``, the manifest last, all fsynced."""
    tensors = {"adapter": state.adapter, "emulator": state.emulator, "partial": state.partial,
               "wire_residual": state.wire_residual}
    for name, values in tensors.items():
        if values or name in ("adapter", "emulator"):
            save_file({k: v.contiguous() for k, v in values.items()}, str(tmp / f"{name}.safetensors"))
    meta = {"round": state.round, "emulator_version": state.emulator_version,
            "holders": state.holders, "metrics": state.metrics, "method": state.method,
            "releases": state.releases}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for path in [*files, tmp / MANIFEST, tmp]:
        _fsync(path)


def save_checkpoint(state: ServerState, folder: Path | str) -> None:
    """Write ``folder`` as a whole or not at all; the checkpoint it replaces becomes
    ``folder.prev``."""
    folder = Path(folder)
    tmp, prev = _sibling(folder, ".tmp"), _sibling(folder, ".prev")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(_sibling(folder, ".old"), ignore_errors=True)  # an older fedsoda's leftover
    tmp.mkdir(parents=True)
    _write(state, tmp)
    if folder.exists():
        if (folder / "state.json").exists():
            shutil.rmtree(prev, ignore_errors=True)
            os.replace(folder, prev)
        else:  # a folder a crash left incomplete: not worth keeping as the fallback
            shutil.rmtree(folder)
    os.replace(tmp, folder)
    _fsync(folder.parent)


def verify(folder: Path) -> None:
    """Raise ``CheckpointError`` unless every file the manifest lists is there, whole and
    unaltered. A checkpoint without a manifest (written before it existed) is taken as is."""
    if not (folder / "state.json").exists():
        raise CheckpointError(f"{folder} has no state.json")
    if not (folder / MANIFEST).exists():
        return
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{folder / MANIFEST} is not valid JSON") from None
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path} is {path.stat().st_size} bytes, the manifest says "
                                  f"{expected['bytes']} (truncated or overwritten)")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the manifest (altered)")


def _read(folder: Path) -> ServerState:
    meta = json.loads((folder / "state.json").read_text())
    optional = {name: load_file(str(folder / f"{name}.safetensors"))
                if (folder / f"{name}.safetensors").exists() else {}
                for name in ("partial", "wire_residual")}
    return ServerState(round=meta["round"], adapter=load_file(str(folder / "adapter.safetensors")),
                       emulator=load_file(str(folder / "emulator.safetensors")),
                       emulator_version=meta["emulator_version"], holders=meta["holders"],
                       metrics=meta["metrics"], method=meta.get("method", {}),
                       releases=meta.get("releases", {}), **optional)


def load_checkpoint(folder: Path | str) -> ServerState:
    """The latest intact checkpoint: ``folder``, else (with a warning) the one before it."""
    folder = Path(folder)
    candidates = [folder, _sibling(folder, ".prev"), _sibling(folder, ".old")]
    problems = []
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            verify(candidate)
            state = _read(candidate)
        except (CheckpointError, SafetensorError, OSError, ValueError, KeyError) as error:
            problems.append(f"{candidate.name}: {error}")
            continue
        if candidate != folder:
            log.warning("the latest checkpoint cannot be used (%s); resuming from %s, round %d",
                        "; ".join(problems) or f"{folder} is missing", candidate, state.round)
        return state
    if not problems:
        raise FileNotFoundError(f"no checkpoint in {folder}; nothing to resume")
    raise CheckpointError(f"no intact checkpoint in {folder.parent}: {'; '.join(problems)}; "
                          "start the run afresh (--overwrite)")
