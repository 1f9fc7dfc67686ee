"""The ClientApp: holds the model files it was sent, trains the LoRA of its assignment on its
own data.

Message types it answers:
- ``query.hello``: which client (partition id) this node is, how many examples it holds
  and of which label, and which of the run's files (by content hash) it already keeps;
- ``query.deliver``: files it lacks, each checked against its hash, kept in its storage;
- ``query.probe`` (FedPruner): the layers' CKA matrix and block influence on its own data;
- ``train``: a ``TrainConfig`` (its assignment: layers held, layers trained, settings), the
  global LoRA of its trained layers (and the emulator LoRA when its copy is stale); replies
  with the trained LoRA, named by full-model layer, and the number of local examples.

Data: a SuperNode started with ``--node-config "data-path=FILE_OR_FOLDER"`` trains on that
(JSON Lines in the task's schema); otherwise, in simulation, on its partition of the shared
data set. Storage: everything lives under ``node_storage``; every path part the server sends
is checked (``fedsoda.federated.messages``), so nothing is written elsewhere.

Between realignments the sub-emulator is frozen, so each client keeps the emulator's output
for the examples it has drawn (``fedsoda.activation_cache``) and trains the adapter from it;
a new emulator LoRA empties the cache. ``activation_cache = false`` in the run config (or
``FEDSODA_ACTIVATION_CACHE=0``) turns it off; results match within float tolerance.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from transformers import AutoTokenizer

from fedsoda.activation_cache import ActivationCache, MiB
from fedsoda.data.partition import task_partitions
from fedsoda.data.task import EncodedExamples, pad_id, read_client_rows
from fedsoda.data.tasks import get_task
from fedsoda.federated.dp import privatize
from fedsoda.federated.messages import (
    KEY,
    SHA256,
    DataSpec,
    MessageError,
    ProbeConfig,
    TrainConfig,
    checked,
    read_blobs,
    read_lora_record,
    to_record,
    wire_record,
)
from fedsoda.models import cache_dir
from fedsoda.surgery.blocks import drop_blocks
from fedsoda.surgery.cka import cka_matrix
from fedsoda.surgery.layered import load_layered
from fedsoda.surgery.lora import (
    LoraSpec,
    attach_lora,
    load_lora_state,
    read_lora,
    save_lora,
    to_full,
    to_local,
)
from fedsoda.surgery.quantize import load_client_weights
from fedsoda.surgery.streamed import streamed_probe
from fedsoda.training import configure_threads, local_train, probe_batches
from fedsoda.wire import encode

app = ClientApp()
CACHE_MIB = 256  # activation cache kept in memory; the rest spills to the client's storage


def partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None or not str(value).isdigit():
        raise ValueError(f"this SuperNode's partition-id is {value!r}; start it with "
                         "--node-config 'partition-id=K num-partitions=N [data-path=FILE]'")
    return int(value)


def node_storage(partition: int) -> Path:
    """What this client keeps on its device (one folder per simulated client)."""
    return cache_dir() / "clients" / f"client-{int(partition)}"


def blob_path(storage: Path, digest: str) -> Path:
    return storage / "blobs" / checked(digest, SHA256, "file hash")


def machine_blob(digest: str) -> Path:
    """This machine's one copy of a file its clients were sent. Simulated clients (80 in
    HierFedLoRA's scale run) each hold a hard link to it, not their own copy of a 266 MiB
    model (21 GB for 80). A SuperNode of scripts/deploy_local.sh has a cache of its own, so
    deployed clients share nothing."""
    return cache_dir() / "blobs" / checked(digest, SHA256, "file hash")


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copyfile(source, target)


def emulator_path(storage: Path, run: str) -> Path:
    """This run's emulator LoRA on the client (full-model names).

    Kept per run: two runs on one machine can share a client model while realigning
    differently, and one must not overwrite the other's emulator LoRA.
    """
    return storage / "runs" / checked(run, KEY, "run key") / "emulator_lora.safetensors"


def data_path(context: Context) -> str:
    return str(context.node_config.get("data-path", "") or "")


# A simulation actor serves many clients (80 in HierFedLoRA's scale run): each keeps its
# rows and examples here, and the shared data set's partition is drawn once per process
# (2 s for SST-2), not once per client it serves.
CLIENTS_KEPT = 128


@lru_cache(maxsize=2)
def _partitions(data: DataSpec) -> tuple[list[dict], list[list[int]]]:
    return task_partitions(data.task, data.clients, data.partition, data.seed, data.data_dir or None,
                           data.reserve)


@lru_cache(maxsize=CLIENTS_KEPT)
def client_rows(data: DataSpec, pid: int, own: str) -> list[dict]:
    """This client's training rows: its own file (node config ``data-path``) or, without
    one, its partition ``pid`` of the shared data set."""
    if own:
        return read_client_rows(get_task(data.task), own)
    rows, parts = _partitions(data)
    return [rows[i] for i in parts[pid]]


@lru_cache(maxsize=8)
def _tokenizer(folder: str):
    return AutoTokenizer.from_pretrained(folder)


@lru_cache(maxsize=CLIENTS_KEPT)
def _examples(data: DataSpec, pid: int, own: str, tokenizer_folder: str) -> EncodedExamples:
    return EncodedExamples(get_task(data.task), client_rows(data, pid, own),
                           _tokenizer(tokenizer_folder), data.max_tokens)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    config = message.content["config"]
    storage, data = node_storage(partition_id(context)), DataSpec.from_record(config)
    hashes = config["hashes"] if "hashes" in config else []
    held = [h for h in hashes if blob_path(storage, h).is_file()]
    rows = client_rows(data, partition_id(context), data_path(context))
    # The label histogram (the task's partition key: GSM8K's derived one), which group-based
    # methods (HierFedLoRA) need; a client declares it as it declares its example count.
    labels = Counter(get_task(data.task).partition_key(row) for row in rows)
    reply = MetricRecord({"partition_id": partition_id(context), "num_examples": len(rows)})
    config = ConfigRecord({"held": held, "label_keys": sorted(labels),
                           "label_counts": [labels[k] for k in sorted(labels)]})
    return Message(RecordDict({"metrics": reply, "config": config}), reply_to=message)


@app.query("deliver")
def deliver(message: Message, context: Context) -> Message:
    """Keep the files sent (each verified against its content hash), written atomically."""
    storage = node_storage(partition_id(context))
    for digest, data in read_blobs(message.content["files"]).items():
        shared, path = machine_blob(digest), blob_path(storage, digest)
        shared.parent.mkdir(parents=True, exist_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not shared.is_file():  # two processes may write it at once: each its own .partial
            tmp = shared.with_name(f"{digest}.{os.getpid()}.partial")
            tmp.write_bytes(data)
            tmp.replace(shared)
        if path.is_file() and path.samefile(shared):
            continue  # already held (renaming a link onto its own file would do nothing)
        tmp = path.with_name(digest + ".partial")
        tmp.unlink(missing_ok=True)
        link_or_copy(shared, tmp)
        tmp.replace(path)
    return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=message)


def model_folder(storage: Path, config: TrainConfig | ProbeConfig) -> Path:
    """The message's files under their names, in a folder named by the model hash (hard
    links to the stored blobs; built once, atomically)."""
    folder = storage / "models" / config.model_hash
    if (folder / ".complete").exists():
        return folder
    partial = folder.with_name(config.model_hash + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, digest in config.files:
        blob = blob_path(storage, digest)
        if not blob.is_file():
            raise FileNotFoundError(f"client {storage.name} lacks file {name} ({digest[:12]}); the "
                                    "server sends missing files before the train message")
        link_or_copy(blob, partial / name)
    (partial / ".complete").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


@lru_cache(maxsize=2)
def _client_model(folder: str, kind: str, quantization: str, layers: tuple, lora_positions: tuple,
                  spec: LoraSpec, blocks: tuple = ()) -> torch.nn.Module:
    # One instance per process and model: LoRA tensors are loaded into it on every call.
    configure_threads()
    if kind == "folder":
        base = load_client_weights(folder, quantization)
    else:
        base = load_layered(folder, layers)
    if set(blocks) - {"attn+mlp"}:
        drop_blocks(base, blocks)  # before LoRA: dropped projections get none
    torch.manual_seed(0)  # every LoRA tensor is overwritten before training; reproducible anyway
    return attach_lora(base, list(lora_positions), spec)


@lru_cache(maxsize=16)
def _activation_cache(folder: str, key: tuple) -> ActivationCache:
    # One cache per run, model and client data (a simulation actor may serve several clients);
    # what exceeds the memory budget goes to the client's own storage, in the run's folder.
    spill = Path(folder) / "activations" / f"{zlib.crc32(repr(key).encode()):08x}"
    return ActivationCache(max_bytes=CACHE_MIB * MiB, spill_dir=spill, max_disk_bytes=4096 * MiB)


def cache_enabled(config: TrainConfig) -> bool:
    """The activation cache is on unless the run config or the environment turns it off."""
    if os.environ.get("FEDSODA_ACTIVATION_CACHE", "1").strip().lower() in ("0", "false", "no"):
        return False
    return config.activation_cache


def prepared_model(storage: Path, config: TrainConfig,
                   content: RecordDict) -> tuple[torch.nn.Module, Path, dict]:
    """The client model of the assignment holding the run's emulator LoRA and the global LoRA,
    the folder it was built from, and the global LoRA as decoded (full-model names)."""
    a = config.assignment
    if a.blocks and a.kind != "layers":
        raise MessageError("blocks can be dropped only from a layered client model")
    emulator = emulator_path(storage, config.run)
    if "emulator" in content:  # the run's first round here, or a realignment
        save_lora(read_lora_record(content["emulator"], config.wire), emulator)
    if a.frozen_lora and not emulator.exists():
        raise FileNotFoundError(f"client {storage.name} holds no emulator LoRA of run "
                                f"{config.run} ({emulator}); the server sends it with a run's "
                                "first train message to each client. Was this client's storage "
                                "cleared during the run? Start the run afresh (a new --out).")
    folder = model_folder(storage, config)
    model = _client_model(str(folder), a.kind, a.quantization, a.layers,
                          tuple(a.position(i) for i in a.lora_layers), config.lora, a.blocks)
    if a.frozen_lora:
        load_lora_state(model, to_local(read_lora(emulator), a.layers))
    start = read_lora_record(content["adapter"], config.wire)
    load_lora_state(model, to_local(start, a.layers))
    return model, folder, start


def residual_folder(storage: Path, run: str) -> Path:
    """This run's upload rounding residuals on the client, one file per (round, step) it
    trained; the two newest are kept, so a round the server plays again after a crash
    starts from the residual it started from the first time."""
    return storage / "runs" / checked(run, KEY, "run key") / "wire_residual"


def _residual_name(config: TrainConfig) -> str:
    return f"{config.round:06d}-{config.step:03d}.safetensors"


def upload(storage: Path, config: TrainConfig, update: dict, start: dict):
    """The reply's LoRA record: the trained LoRA itself (fp32), or its change from the LoRA
    the client started from, quantized, with the last upload's residual carried in."""
    wire = config.wire
    if not wire.quantized:
        return to_record(update)
    missing = sorted(set(update) - set(start))
    if missing:
        raise MessageError(f"the server sent no LoRA for trained tensors {missing[:2]}")
    delta = {key: value - start[key] for key, value in update.items()}
    if not wire.feedback_up:
        return wire_record(encode(delta, wire), wire)
    folder, name = residual_folder(storage, config.run), _residual_name(config)
    earlier = sorted(p.name for p in folder.glob("*.safetensors") if p.name < name) \
        if folder.is_dir() else []
    residual = read_lora(folder / earlier[-1]) if earlier else {}
    encoded = encode(delta, wire, residual)
    save_lora(encoded.residual, folder / name)
    for old in earlier[:-1]:
        (folder / old).unlink(missing_ok=True)
    return wire_record(encoded, wire)


@app.train()
def train(message: Message, context: Context) -> Message:
    config = TrainConfig.from_record(message.content["config"])
    a, pid = config.assignment, partition_id(context)
    storage = node_storage(pid)
    model, folder, start = prepared_model(storage, config, message.content)
    examples = _examples(config.data, pid, data_path(context), str(folder))
    cache = None
    if cache_enabled(config):
        cache = _activation_cache(str(emulator_path(storage, config.run).parent),
                                  (config.data, pid, config.model_hash))
        if "emulator" in message.content:
            cache.invalidate()  # the fingerprint check would catch it too; say it plainly
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    # Intra-group rounds (HierFedLoRA) draw fresh batches; step 0 keeps every other
    # method's seed as it always was.
    seed = zlib.crc32(json.dumps([config.data.seed, config.round, pid]
                                 + ([config.step] if config.step else [])).encode())
    result = local_train(model, [a.position(i) for i in a.trainable], examples, a.local_steps,
                         a.batch_size, a.lr, a.mu, seed, tokenizer_pad_id(str(folder)), cache=cache)
    metrics = MetricRecord({"num_examples": len(examples), "train_loss": result["loss"],
                            "seconds": result["seconds"], "partition_id": pid,
                            "cache_hits": cache.hits - hits if cache is not None else 0,
                            "cache_misses": cache.misses - misses if cache is not None else 0})
    trained = to_full(result["state"], a.layers)
    if config.dp.enabled:  # clipped and noised here: the server never sees the raw update
        trained, _ = privatize(trained, start, config.dp)
    adapter = upload(storage, config, trained, start)
    return Message(RecordDict({"adapter": adapter, "metrics": metrics}), reply_to=message)


@app.query("probe")
def probe(message: Message, context: Context) -> Message:
    """FedPruner's similarity probe: the global model (base weights and the global LoRA sent
    along), run one layer at a time on a seeded sample of this client's own examples, so its
    memory holds one layer; replies with the layers' linear CKA matrix and block influence."""
    config = ProbeConfig.from_record(message.content["config"])
    pid = partition_id(context)
    folder = model_folder(node_storage(pid), config)
    examples = _examples(config.data, pid, data_path(context), str(folder))
    rng = random.Random(zlib.crc32(json.dumps(["probe", config.data.seed, config.round, pid]).encode()))
    picks = rng.sample(range(len(examples)), min(config.samples, len(examples)))
    pad = tokenizer_pad_id(str(folder))
    batches = probe_batches([examples[i] for i in picks], pad)
    configure_threads()
    result = streamed_probe(folder, config.num_layers, batches,
                            lora=read_lora_record(message.content["adapter"], config.wire),
                            spec=config.lora, skip_first=config.skip_first, max_tokens=config.max_tokens,
                            units=config.units, dtype=getattr(torch, config.dtype))
    result, units = result if config.units else (result, None)
    arrays = {"similarity": cka_matrix(result.outputs).float(),
              "influence": torch.tensor(result.influence, dtype=torch.float32)}
    if units is not None:  # FedPruner+: the attention and MLP blocks as units of their own
        arrays.update(similarity_attn=cka_matrix(units.attn_outputs).float(),
                      similarity_mlp=cka_matrix(units.mlp_outputs).float(),
                      influence_attn=torch.tensor(units.attn_influence, dtype=torch.float32),
                      influence_mlp=torch.tensor(units.mlp_influence, dtype=torch.float32))
    metrics = MetricRecord({"num_examples": len(examples), "tokens": result.tokens, "partition_id": pid})
    return Message(RecordDict({"probe": to_record(arrays), "metrics": metrics}), reply_to=message)


def tokenizer_pad_id(folder: str) -> int:
    return pad_id(_tokenizer(folder))
