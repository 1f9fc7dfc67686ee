"""What goes on the wire: the typed train message (``TrainConfig``) and the handshake's data
settings (``DataSpec``), LoRA tensor dicts and content-addressed files as Flower records, and
the bytes and parameters they really take.

Both the ServerApp and the ClientApp build and read messages only through this module. Every
field read from a record is checked for its type, and every path part a client receives
(run key, model hash, file names and hashes) for its form, so a malformed or crafted message
is a one-line ``MessageError``, never a traceback deep in the client or a write outside the
client's storage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedsoda.dp_settings import DPSettings
from fedsoda.methods.assignment import Assignment
from fedsoda.methods.pruner_settings import PROBE_DTYPES
from fedsoda.surgery.lora import LoraSpec
from fedsoda.wire import Encoded, WireError, WireSettings, decode_tensor, encode

KEY = re.compile(r"[0-9a-f]{16}")  # run keys and model hashes
SHA256 = re.compile(r"[0-9a-f]{64}")  # file content hashes
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a plain file name, no folders


class MessageError(ValueError):
    """A message that does not have the expected form (what is wrong, in one line)."""


def file_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checked(value, pattern: re.Pattern, what: str) -> str:
    """``value`` if it is a string of the form ``pattern``; else a MessageError."""
    if not isinstance(value, str) or not pattern.fullmatch(value) or value in (".", ".."):
        raise MessageError(f"{what} {value!r} is not a valid name (expected {pattern.pattern})")
    return value


def _field(record, key: str, kind, what: str):
    if key not in record:
        raise MessageError(f"{what} has no {key!r}")
    value = record[key]
    ok = (isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))) \
        or (kind is float and isinstance(value, int) and not isinstance(value, bool))
    if kind is list:
        ok = isinstance(value, list)
    if not ok:
        raise MessageError(f"{what}: {key!r} must be {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


@dataclass(frozen=True)
class DataSpec:
    """Which data a client trains on: its partition of a shared set (simulation), unless the
    SuperNode brings its own data (node config ``data-path``)."""

    task: str
    data_dir: str
    clients: int
    partition: str
    seed: int
    max_tokens: int
    reserve: int = 0  # training rows the server keeps back to align on (no client holds them)

    def to_record(self) -> ConfigRecord:
        # ``reserve`` travels only when set: a run without it sends what it always sent.
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "reserve" or v}
        return ConfigRecord({f"data.{k}": v for k, v in values.items()})

    @classmethod
    def from_record(cls, record) -> DataSpec:
        kinds = {"task": str, "data_dir": str, "clients": int, "partition": str, "seed": int,
                 "max_tokens": int}
        if "data.reserve" in record:
            kinds["reserve"] = int
        return cls(**{k: _field(record, f"data.{k}", t, "data settings") for k, t in kinds.items()})


def files_hash(kind: str, quantization: str, files) -> str:
    return hashlib.sha256(json.dumps([kind, quantization, sorted(map(list, files))]).encode()
                          ).hexdigest()[:16]


def _record(data: DataSpec, lora: LoraSpec, wire: WireSettings, files, values: dict) -> ConfigRecord:
    """One config record: the data settings, the LoRA spec, the wire format, the files and
    ``values``."""
    record = data.to_record()
    for key, value in {"lora.r": lora.r, "lora.alpha": lora.alpha, "wire.format": wire.format,
                       "wire.block": wire.block, "wire.error_feedback": wire.error_feedback,
                       "lora.dropout": float(lora.dropout), "lora.targets": list(lora.targets),
                       "file_names": [n for n, _ in files], "file_hashes": [h for _, h in files],
                       **values}.items():
        record[key] = value
    return record


def _lora(record, what: str) -> LoraSpec:
    get = lambda key, kind: _field(record, key, kind, what)  # noqa: E731
    try:
        return LoraSpec(r=get("lora.r", int), alpha=get("lora.alpha", int),
                        dropout=get("lora.dropout", float), targets=tuple(get("lora.targets", list)))
    except (TypeError, ValueError) as error:
        raise MessageError(f"{what}: {error}") from None


def _wire(record, what: str) -> WireSettings:
    get = lambda key, kind: _field(record, key, kind, what)  # noqa: E731
    try:
        return WireSettings(format=get("wire.format", str), block=get("wire.block", int),
                            error_feedback=get("wire.error_feedback", str))
    except ValueError as error:
        raise MessageError(f"{what}: {error}") from None


def _dp(record, what: str) -> DPSettings:
    try:
        return DPSettings(clip=_field(record, "dp.clip", float, what),
                          noise=_field(record, "dp.noise", float, what))
    except ValueError as error:
        raise MessageError(f"{what}: {error}") from None


def _files(record, what: str) -> tuple[tuple[str, str], ...]:
    names = [checked(n, FILE_NAME, "file name") for n in _field(record, "file_names", list, what)]
    hashes = [checked(h, SHA256, "file hash") for h in _field(record, "file_hashes", list, what)]
    if len(names) != len(hashes) or len(set(names)) != len(names):
        raise MessageError(f"{what}: file names and hashes must pair up, one per name")
    return tuple(zip(names, hashes, strict=True))


@dataclass(frozen=True)
class ProbeConfig:
    """The ``config`` record of a probe message (FedPruner): run the global model, one layer
    at a time, on ``samples`` of the client's own examples and report every layer pair's
    linear CKA and every layer's block influence."""

    run: str
    round: int
    files: tuple[tuple[str, str], ...]  # the layered model: config, base, every layer
    num_layers: int
    data: DataSpec
    lora: LoraSpec
    samples: int = 16
    skip_first: bool = True
    max_tokens: int = 2048
    units: bool = False  # FedPruner+: also the attention and MLP blocks' CKA and influence
    dtype: str = "float32"  # how the kept rows are stored until CKA: float32 or bfloat16
    wire: WireSettings = WireSettings()  # how the global LoRA sent along is encoded

    @property
    def model_hash(self) -> str:
        return files_hash("layers", "bf16", self.files)

    def to_record(self) -> ConfigRecord:
        return _record(self.data, self.lora, self.wire, self.files, {
            "run": self.run, "round": self.round, "num_layers": self.num_layers,
            "samples": self.samples, "skip_first": self.skip_first, "max_tokens": self.max_tokens,
            "units": self.units, "dtype": self.dtype})

    @classmethod
    def from_record(cls, record) -> ProbeConfig:
        what = "probe config"
        get = lambda key, kind: _field(record, key, kind, what)  # noqa: E731
        config = cls(run=checked(get("run", str), KEY, "run key"), round=get("round", int),
                     files=_files(record, what), num_layers=get("num_layers", int),
                     data=DataSpec.from_record(record), lora=_lora(record, what),
                     samples=get("samples", int),
                     skip_first=get("skip_first", bool), max_tokens=get("max_tokens", int),
                     units=get("units", bool), dtype=get("dtype", str), wire=_wire(record, what))
        if min(config.num_layers, config.samples, config.max_tokens) < 1:
            raise MessageError(f"{what}: num_layers, samples and max_tokens must be >= 1")
        if config.dtype not in PROBE_DTYPES:
            raise MessageError(f"{what}: dtype must be one of {PROBE_DTYPES}, got {config.dtype!r}")
        return config


@dataclass(frozen=True)
class TrainConfig:
    """The ``config`` record of a train message: the client's assignment and the run's settings."""

    run: str  # names this run's files on the client
    round: int
    assignment: Assignment
    data: DataSpec
    lora: LoraSpec
    activation_cache: bool = True
    step: int = 0  # the intra-group round within the global round (HierFedLoRA), else 0
    wire: WireSettings = WireSettings()  # how LoRA travels both ways (fedsoda.wire)
    dp: DPSettings = DPSettings()  # clipping and noise of the update (fedsoda.federated.dp)

    @property
    def model_hash(self) -> str:
        """Names the client model built from the assignment's files (computed on each side
        from what the model is made of, so it is never a path part the server chose)."""
        a = self.assignment
        return files_hash(a.kind, a.quantization, a.files)

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        return self.assignment.files

    def to_record(self) -> ConfigRecord:
        a = self.assignment
        return _record(self.data, self.lora, self.wire, a.files, {
            "run": self.run, "round": self.round, "step": self.step,
            "activation_cache": self.activation_cache, "layers": list(a.layers),
            "trainable": list(a.trainable),
            "frozen_lora": list(a.frozen_lora), "blocks": list(a.blocks), "kind": a.kind,
            "quantization": a.quantization, "local_steps": a.local_steps,
            "batch_size": a.batch_size, "lr": float(a.lr), "mu": float(a.mu),
            "dp.clip": float(self.dp.clip), "dp.noise": float(self.dp.noise)})

    @classmethod
    def from_record(cls, record) -> TrainConfig:
        """Read and check a train message's config; a MessageError says what is wrong."""
        what = "train config"
        get = lambda key, kind: _field(record, key, kind, what)  # noqa: E731
        lists = {k: get(k, list) for k in ("layers", "trainable", "frozen_lora", "blocks")}
        for key in ("layers", "trainable", "frozen_lora"):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in lists[key]):
                raise MessageError(f"{what}: {key!r} must list layer indices, got {lists[key]!r}")
        files = _files(record, what)
        if get("step", int) < 0:
            raise MessageError(f"{what}: 'step' must be >= 0")
        try:
            assignment = Assignment(
                layers=tuple(lists["layers"]), trainable=tuple(lists["trainable"]),
                files=files, kind=get("kind", str),
                quantization=get("quantization", str), frozen_lora=tuple(lists["frozen_lora"]),
                blocks=tuple(lists["blocks"]), local_steps=get("local_steps", int),
                batch_size=get("batch_size", int), lr=get("lr", float), mu=get("mu", float))
        except (TypeError, ValueError) as error:
            raise MessageError(f"{what}: {error}") from None
        return cls(run=checked(get("run", str), KEY, "run key"), round=get("round", int),
                   assignment=assignment, data=DataSpec.from_record(record), lora=_lora(record, what),
                   activation_cache=get("activation_cache", bool), step=get("step", int),
                   wire=_wire(record, what), dp=_dp(record, what))


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """LoRA tensors -> ``ArrayRecord`` (float32, names kept)."""
    return ArrayRecord(OrderedDict((k, Array(v.detach().cpu().float().contiguous().numpy()))
                                   for k, v in state.items()))


def ndarray(array, key: str, dtype: str) -> np.ndarray:
    """The values of a received array, if it is what Flower serializes a numpy array of
    ``dtype`` as and its bytes hold the shape it declares; else a MessageError."""
    if not isinstance(array, Array) or array.stype != "numpy.ndarray" or array.dtype != dtype:
        raise MessageError(f"{str(key)[:80]}: a {getattr(array, 'dtype', '?')!s:.20} array "
                           f"({getattr(array, 'stype', '?')!s:.30}), expected numpy {dtype}")
    try:
        values = array.numpy()
    except Exception as error:  # noqa: BLE001 - whatever np.load makes of foreign bytes
        raise MessageError(f"{str(key)[:80]}: undecodable array ({type(error).__name__})") from None
    if values.dtype != np.dtype(dtype) or tuple(values.shape) != tuple(array.shape):
        raise MessageError(f"{str(key)[:80]}: its bytes hold {values.dtype} {values.shape}, not "
                           f"the {dtype} {tuple(array.shape)} it declares")
    return values


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``ArrayRecord`` of float32 arrays -> tensors (a MessageError for anything else).
    Conversion goes through numpy so it works in any process."""
    return {key: torch.from_numpy(np.array(ndarray(array, key, "float32"), copy=True))
            for key, array in record.items()}


def wire_record(encoded: Encoded, settings: WireSettings, keys=None) -> ArrayRecord:
    """Quantized LoRA tensors (``fedsoda.wire.encode``) as an ``ArrayRecord``: one array per
    tensor, its buffer the codes and block scales, its shape the tensor's, its ``stype`` the
    encoding. ``keys``: only these tensors (a client's share of one broadcast)."""
    keys = encoded.data if keys is None else keys
    return ArrayRecord(OrderedDict(
        (k, Array(dtype=settings.format, shape=encoded.shapes[k], stype=settings.tag,
                  data=encoded.data[k])) for k in keys))


def lora_record(state: dict[str, torch.Tensor], settings: WireSettings) -> ArrayRecord:
    """LoRA tensors as ``settings`` sends them, without error feedback (a state sent once:
    the emulator LoRA)."""
    if not settings.quantized:
        return to_record(state)
    return wire_record(encode(state, settings), settings)


def read_lora_record(record: ArrayRecord, settings: WireSettings) -> dict[str, torch.Tensor]:
    """The float32 tensors of a LoRA record encoded as ``settings`` says; a MessageError if
    an array is encoded otherwise or its bytes cannot be what the codec wrote."""
    if not settings.quantized:
        return from_record(record)
    tensors = {}
    for key, array in record.items():
        if array.stype != settings.tag or array.dtype != settings.format:
            raise MessageError(f"{key}: encoded as {array.stype!r}, expected {settings.tag!r}")
        if not all(isinstance(n, int) and n >= 0 for n in array.shape):
            raise MessageError(f"{key}: shape {array.shape!r} is not a tensor's")
        try:
            tensors[key] = decode_tensor(array.data, tuple(array.shape), settings.format,
                                         settings.block)
        except WireError as error:
            raise MessageError(f"{key}: {error}") from None
    return tensors


def record_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of a record's arrays (what is actually sent)."""
    return sum(len(array.data) for array in record.values())


def record_params(record: ArrayRecord) -> int:
    """Number of values in the record's arrays (a quantized array's shape is its tensor's)."""
    return sum(int(np.prod(array.shape)) for array in record.values())


def blobs_record(paths: dict[str, Path]) -> ArrayRecord:
    """Files by content hash (``sha256 -> path``) as raw bytes: what a client lacks."""
    return ArrayRecord(OrderedDict((digest, Array(np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)))
                                   for digest, path in sorted(paths.items())))


def read_blobs(record: ArrayRecord) -> dict[str, bytes]:
    """The files of a blobs record, each checked against its content hash."""
    blobs = {}
    for digest, array in record.items():
        checked(digest, SHA256, "file hash")
        data = ndarray(array, digest, "uint8").tobytes()
        if file_hash(data) != digest:
            raise MessageError(f"file {digest[:12]}...: content does not match its hash")
        blobs[digest] = data
    return blobs


def files_record(folder: Path | str) -> ArrayRecord:
    """Every file of a model folder as raw bytes (the one-time sub-LLM download)."""
    folder = Path(folder)
    return ArrayRecord(OrderedDict(
        (path.name, Array(np.frombuffer(path.read_bytes(), dtype=np.uint8)))
        for path in sorted(folder.iterdir()) if path.is_file()))


def write_files(record: ArrayRecord, folder: Path | str) -> Path:
    """Write a files record into ``folder`` atomically (a partial folder is never used);
    every name and array is checked before anything is written."""
    folder = Path(folder)
    files = {checked(name, FILE_NAME, "file name"): ndarray(array, name, "uint8").tobytes()
             for name, array in record.items()}  # no path parts, no hidden files
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (partial / name).write_bytes(data)
    if folder.exists():
        shutil.rmtree(folder)
    partial.rename(folder)
    return folder
