"""The FedSODA ClientApp: holds the NF4 sub-LLM, trains the adapter LoRA on private data.

Message types it answers:
- ``query.hello``: which partition this node serves, and whether it already holds the
  sub-LLM with the given content hash (so the download happens once);
- ``query.deliver``: the sub-LLM files, written to the node's own storage;
- ``train``: the global adapter LoRA (and the emulator LoRA after a realignment); replies
  with the trained adapter LoRA and the number of local examples.

Between realignments the sub-emulator is frozen, so each client keeps the emulator's output
for the examples it has drawn (``fedsoda.activation_cache``) and trains the adapter from it;
a new emulator LoRA empties the cache. ``activation_cache = false`` in the run config (or
``FEDSODA_ACTIVATION_CACHE=0``) turns it off; results match within float tolerance.
"""

from __future__ import annotations

import json
import os
import zlib
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsoda.activation_cache import ActivationCache, MiB
from fedsoda.data.partition import task_partitions
from fedsoda.data.task import EncodedExamples, pad_id
from fedsoda.data.tasks import get_task
from fedsoda.federated.messages import from_record, to_record, write_files
from fedsoda.models import cache_dir
from fedsoda.surgery.build import SubLLM, open_sub_llm
from fedsoda.surgery.lora import load_lora_state, read_lora, save_lora
from fedsoda.training import configure_threads, local_train

app = ClientApp()


def partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id in its node config; start it with "
                         "--node-config 'partition-id=K num-partitions=N'")
    return int(context.node_config["partition-id"])


def node_storage(partition: int) -> Path:
    """What this client keeps on its device (one folder per simulated client)."""
    return cache_dir() / "clients" / f"client-{partition}"


def emulator_path(folder: Path, run_key: str) -> Path:
    """This run's emulator LoRA on the client.

    Kept per run: two runs on one machine can share a sub-LLM (same weights and layout, so
    the same content hash and folder) while realigning differently, and one must not
    overwrite the other's emulator LoRA.
    """
    return folder / "runs" / run_key / "emulator_lora.safetensors"


def _holds(partition: int, model_hash: str) -> bool:
    return (node_storage(partition) / model_hash / "model" / "config.json").exists()


@lru_cache(maxsize=2)
def _sub_llm(folder: str) -> SubLLM:
    # One instance per process and model: LoRA tensors are loaded into it on every call.
    configure_threads()
    return open_sub_llm(folder)


@lru_cache(maxsize=16)
def _activation_cache(folder: str, examples_key: tuple, max_mib: int) -> ActivationCache:
    # One cache per run and client data (a simulation actor may serve several clients);
    # what exceeds the memory budget goes to the client's own storage, in the run's folder.
    spill = Path(folder) / "activations" / f"{zlib.crc32(repr(examples_key).encode()):08x}"
    return ActivationCache(max_bytes=max_mib * MiB, spill_dir=spill, max_disk_bytes=4096 * MiB)


def cache_enabled(config) -> bool:
    """The activation cache is on unless the run config or the environment turns it off."""
    if os.environ.get("FEDSODA_ACTIVATION_CACHE", "1").strip().lower() in ("0", "false", "no"):
        return False
    value = config.get("activation_cache", True)
    return str(value).lower() not in ("0", "false", "no", "")


@lru_cache(maxsize=4)
def _examples(task_name: str, data_dir: str | None, clients: int, scheme: str, seed: int,
              partition_index: int, max_tokens: int, tokenizer_folder: str) -> EncodedExamples:
    from transformers import AutoTokenizer

    rows, parts = task_partitions(task_name, clients, scheme, seed, data_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    mine = [rows[i] for i in parts[partition_index]]
    return EncodedExamples(get_task(task_name), mine, tokenizer, max_tokens)


@app.query("hello")
def hello(message: Message, context: Context) -> Message:
    model_hash = str(message.content["config"]["model_hash"])
    pid = partition_id(context)
    reply = MetricRecord({"partition_id": pid, "holds_model": int(_holds(pid, model_hash))})
    return Message(RecordDict({"metrics": reply}), reply_to=message)


@app.query("deliver")
def deliver(message: Message, context: Context) -> Message:
    config = message.content["config"]
    folder = node_storage(partition_id(context)) / str(config["model_hash"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("lora.json", "plan.json"):
        (folder / name).write_text(str(config[name]))
    write_files(message.content["model"], folder / "model")
    emulator = from_record(message.content["emulator"])
    save_lora(emulator, folder / "emulator_lora.safetensors")
    save_lora(emulator, emulator_path(folder, str(config["run"])))
    return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    config = message.content["config"]
    pid = partition_id(context)
    folder = node_storage(pid) / str(config["model_hash"])
    if not _holds(pid, str(config["model_hash"])):
        raise FileNotFoundError(f"client {pid} does not hold sub-LLM {config['model_hash']}")
    emulator = emulator_path(folder, str(config["run"]))
    if "emulator" in message.content:  # the run's first round here, or a realignment
        save_lora(from_record(message.content["emulator"]), emulator)
    if not emulator.exists():
        raise FileNotFoundError(f"client {pid} holds no emulator LoRA of run {config['run']} "
                                f"({emulator}); the server sends it with a run's first train "
                                "message to each client. Was this client's storage cleared "
                                "during the run? Start the run afresh (a new --out).")
    sub = _sub_llm(str(folder))
    load_lora_state(sub.model, read_lora(emulator))
    load_lora_state(sub.model, from_record(message.content["adapter"]))
    key = (str(config["task"]), str(config["data_dir"]) or None, int(config["clients"]),
           str(config["partition"]), int(config["seed"]), pid, int(config["max_tokens"]),
           str(folder / "model"))
    examples = _examples(*key)
    cache = None
    if cache_enabled(config):
        cache = _activation_cache(str(emulator.parent), key,
                                  int(config.get("activation_cache_mib", 256)))
        if "emulator" in message.content:
            cache.invalidate()  # the fingerprint check would catch it too; say it plainly
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    seed = zlib.crc32(json.dumps([int(config["seed"]), int(config["round"]), pid]).encode())
    result = local_train(sub.model, sub.adapter_layers, examples, int(config["local_steps"]),
                         int(config["batch_size"]), float(config["lr"]), float(config["mu"]),
                         seed, sub_pad_id(folder), cache=cache)
    metrics = MetricRecord({"num_examples": len(examples), "train_loss": result["loss"],
                            "seconds": result["seconds"], "partition_id": pid,
                            "cache_hits": cache.hits - hits if cache is not None else 0,
                            "cache_misses": cache.misses - misses if cache is not None else 0})
    return Message(RecordDict({"adapter": to_record(result["state"]), "metrics": metrics}),
                   reply_to=message)


@lru_cache(maxsize=4)
def sub_pad_id(folder: Path) -> int:
    from transformers import AutoTokenizer

    return pad_id(AutoTokenizer.from_pretrained(folder / "model"))


def train_config(**values) -> ConfigRecord:
    """The ``config`` record of a train message (everything a client needs, no more)."""
    return ConfigRecord({k: ("" if v is None else v) for k, v in values.items()})
