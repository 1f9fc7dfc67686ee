"""`fedsoda data partition` and `fedsoda eval`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedsoda.data.partition import (
    PartitionScheme,
    label_counts,
    partition,
    plot_partition,
    reserved_rows,
    round_label_shares,
    sample_round,
)
from fedsoda.data.public import wikitext_paragraphs
from fedsoda.data.task import load_rows
from fedsoda.data.tasks import get_task
from fedsoda.evaluate.perplexity import perplexity
from fedsoda.evaluate.tasks import CUT_FILE, evaluate, evaluation_rows, fit_cut
from fedsoda.models import load


def _write_json(data: dict, out: str | None) -> None:
    print(json.dumps(data, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2) + "\n")


def partition_command(task_name: str, clients: int, scheme: str, seed: int,
                      data_dir: str | None, plot: str | None, out: str | None,
                      rounds: int = 0, clients_per_round: int | None = None) -> dict:
    """Per-client label counts; with ``rounds``, also the label mix each round trains on."""
    task = get_task(task_name)
    parsed = PartitionScheme.parse(scheme)
    per_round = clients if clients_per_round is None else clients_per_round
    if rounds:
        sample_round(seed, clients, per_round, 1)  # a bad clients-per-round fails before loading
    rows = load_rows(task, task.train_split, data_dir)
    keys = [task.partition_key(row) for row in rows]
    parts = partition(keys, clients, parsed, seed)
    result = {"task": task.name, "split": task.train_split, "scheme": str(parsed), "seed": seed,
              "clients": label_counts(keys, parts)}
    if rounds:
        # The same draw as `fedsoda run --seed` makes, so a run's round-by-round accuracy can be
        # read against the labels its sampled clients held (under label skew the global
        # adapter's decision threshold follows them).
        result["rounds"] = [{"round": t, "clients": sampled,
                             "label_shares": round_label_shares(result["clients"], sampled)}
                            for t in range(1, rounds + 1)
                            for sampled in [sample_round(seed, clients, per_round, t)]]
    if plot:
        plot_partition(result["clients"], f"{task.name}, {clients} clients, {parsed}", plot)
    _write_json(result, out)
    return result


def load_for_eval(model_spec: str, adapter: str | None, dtype: str = "float32"):
    """The full model (optionally with a PEFT adapter folder) or a saved sub-LLM folder."""
    if (Path(model_spec) / "lora.json").exists():  # a `fedsoda build` folder: the NF4 sub-LLM
        from transformers import AutoTokenizer

        from fedsoda.surgery.build import open_sub_llm

        if adapter:
            raise ValueError("--adapter applies to a full model, not to a sub-LLM folder")
        tokenizer = AutoTokenizer.from_pretrained(Path(model_spec) / "model")
        return open_sub_llm(model_spec).model, tokenizer
    model, tokenizer = load(model_spec, dtype=getattr(torch, dtype))
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, tokenizer


def adapter_cut(adapter: str, task) -> dict | None:
    """The threshold a run fitted for its exported adapter (``CUT_FILE``), if it did."""
    path = Path(adapter) / CUT_FILE
    if not path.is_file():
        return None
    try:
        fitted = json.loads(path.read_text())
        cut, options = float(fitted["cut"]), fitted["options"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a threshold a run wrote ({error}); delete it to score "
                         "the adapter at the plain option likelihood") from error
    if options != list(task.options):
        raise ValueError(f"{path} cuts the margin between {options}, not {task.name}'s options")
    return {**fitted, "cut": cut, "from": str(path)}


def eval_command(model_spec: str, adapter: str | None, task_name: str, limit: int | None,
                 batch_size: int, data_dir: str | None, out: str | None,
                 dtype: str = "float32", calibrate: int = 0) -> dict:
    """A model's score on a task; with ``calibrate`` > 0, also its accuracy at the option
    threshold fitted on the ``calibrate`` training rows a run keeps back (``align.calibrate``),
    the baseline a calibrated run compares with."""
    cut_rows = fitted = None
    if task_name != "wikitext2":
        task = get_task(task_name)  # validate before loading the model
        rows = evaluation_rows(task, data_dir, limit)
        if calibrate and len(task.options) != 2:
            raise ValueError(f"--calibrate cuts the margin between two answer options; "
                             f"{task_name} has none")
        cut_rows = reserved_rows(task_name, calibrate, data_dir) if calibrate else None
        fitted = adapter_cut(adapter, task) if adapter and not calibrate else None
    elif calibrate:
        raise ValueError("--calibrate applies to sst2 and boolq, not to perplexity")
    model, tokenizer = load_for_eval(model_spec, adapter, dtype)
    if task_name == "wikitext2":
        import time

        began = time.perf_counter()
        lines = wikitext_paragraphs("test", data_dir, min_chars=1)
        result = {"task": "wikitext2", **perplexity(model, tokenizer, lines, max_windows=limit),
                  "seconds": time.perf_counter() - began}
    else:
        if cut_rows:
            fitted = fit_cut(model, tokenizer, task, cut_rows, batch_size)
        result = evaluate(model, tokenizer, task, rows, batch_size, data_dir=data_dir,
                          cut=fitted["cut"] if fitted else None)
        if fitted:
            result["calibration"] = fitted
    result = {"model": model_spec, "adapter": adapter, "dtype": dtype, **result}
    _write_json(result, out)
    return result
