"""`fedsoda bench`: its workload, FLOP counting, comm accounting, ratios and one tiny run.

Expected numbers come from hand formulas and from numpy's own serialization, never from the
benchmark code under test.
"""

import io
import json

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from fedsoda.benchmark import count_flops, fixed_length_examples
from fedsoda.commands.bench import comm_per_round, ratios, run_bench, targets
from fedsoda.data.task import IGNORE_INDEX
from fedsoda.methods import get_recipe
from fedsoda.methods.server_models import make_plan
from fedsoda.models import load
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.plan import PruneSettings

SETTINGS = PruneSettings(n=2, p=2, adapter_layers=3, samples=8, seq_len=32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add barrier waits on a shared CPU
    yield
    torch.set_num_threads(before)


def test_workload_is_fixed_length_sst2_with_the_loss_on_the_answer_only(tiny_model_dir, shared_data):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = fixed_length_examples(tokenizer, seq_len=40, count=6, data_dir=str(shared_data))
    assert len(examples) == 6
    for example in examples:
        assert len(example["input_ids"]) == len(example["labels"]) == 40
        answer = [label for label in example["labels"] if label != IGNORE_INDEX]
        # " positive" / " negative": one word, at the very end, nothing else carries loss
        assert len(answer) == 1 and example["labels"][-1] == example["input_ids"][-1]


def test_flops_of_a_linear_a_4bit_linear_and_cpu_attention_match_hand_formulas():
    x = torch.randn(6, 64)
    linear = torch.nn.Linear(64, 128, bias=False)
    assert count_flops(lambda: linear(x)) == 2 * 6 * 64 * 128

    quantized = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    quantized = quantized.to("cpu")  # quantizes on the move
    assert quantized.weight.dtype == torch.uint8  # a real 4-bit matmul, not a plain linear
    with torch.no_grad():
        assert count_flops(lambda: quantized(x)) == 2 * 6 * 64 * 128

    b, heads, t, d = 2, 3, 16, 8
    q, k, v = (torch.randn(b, heads, t, d) for _ in range(3))
    attention = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert attention == 2 * (2 * b * heads * t * t * d)  # Q K^T, then P V


def npy_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        buffer = io.BytesIO()
        np.save(buffer, tensor.float().numpy(), allow_pickle=False)
        total += len(buffer.getvalue())
    return total


@pytest.mark.parametrize("method, every", [("fedsoda", 5), ("fedbiot", 1), ("fedot", 0)])
def test_comm_per_round_is_adapter_down_and_up_plus_the_amortized_emulator(
        method, every, tmp_path, shared_data, tiny_model_dir):
    full, tokenizer = load(str(tiny_model_dir))
    recipe = get_recipe(method)
    plan = make_plan(recipe, str(tiny_model_dir), full, tokenizer, SETTINGS, str(shared_data),
                     tmp_path / "plan.json")
    sub = make_sub_llm(full, plan, tmp_path / "sub", quantization=recipe.quantization,
                       emulator_lora=recipe.emulator_lora)
    adapter = npy_bytes(sub.adapter_lora().values())
    emulator = npy_bytes(sub.emulator_lora().values())
    comm = comm_per_round(sub, recipe, realign_every=5)
    assert comm["adapter_bytes"] == adapter and comm["emulator_bytes"] == emulator
    assert comm["comm_bytes_per_round"] == pytest.approx(2 * adapter + (emulator / every if every else 0))


def test_ratios_and_targets_by_hand():
    methods = {"fedpetuning": {"step_seconds": 10.0, "peak_memory_bytes": 1000,
                               "client_model_bytes": 300, "comm_bytes_per_round": 40},
               "fedbiot": {"step_seconds": 4.0, "comm_bytes_per_round": 10},
               "fedsoda": {"step_seconds": 3.0, "step_seconds_cached": 1.5, "peak_memory_bytes": 250,
                           "client_model_bytes": 100, "comm_bytes_per_round": 3.2}}
    out = ratios(methods)
    assert out["vs_fedpetuning"]["fedsoda"]["step_seconds"] == pytest.approx(0.3)
    assert out["vs_fedpetuning"]["fedsoda"]["step_seconds_cached"] == pytest.approx(0.15)
    assert out["vs_fedbiot"]["fedsoda"]["comm_bytes_per_round"] == pytest.approx(0.32)
    met = {key: (round(t["value"], 4), t["met"]) for key, t in targets(methods).items()}
    assert met == {"step_vs_fedpetuning": (0.3, True), "step_cached_vs_fedpetuning": (0.15, False),
                   "peak_memory_vs_fedpetuning": (0.25, True),
                   "storage_vs_fedpetuning": (0.3333, True), "comm_vs_fedbiot": (0.32, False)}


@pytest.mark.slow
def test_one_tiny_bench_run_writes_every_figure(tiny_model_dir, shared_data, tmp_path):
    out = tmp_path / "bench.json"
    run_bench(str(tiny_model_dir), ["fedpetuning", "fedbiot", "fedsoda"], quick=True, steps=2,
              batch_size=2, seq_len=32, device="cpu", data_dir=str(shared_data), out=str(out),
              prune=SETTINGS, threads=1)
    result = json.loads(out.read_text())
    soda = result["methods"]["fedsoda"]
    for key in ("step_seconds", "step_seconds_cached", "peak_memory_bytes", "client_model_bytes",
                "comm_bytes_per_round", "step_flops", "step_flops_cached"):
        assert soda[key] > 0, key
    assert soda["cache"]["hits"] > 0 and soda["step_flops_cached"] < soda["step_flops"]
    assert result["methods"]["fedbiot"]["step_seconds"] > 0
    assert "step_seconds_cached" not in result["methods"]["fedbiot"]
    assert set(result["server"]) >= {"sgp_seconds", "pre_align_seconds", "realign_seconds"}
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cores"] >= 1
    assert result["ratios"]["vs_fedpetuning"]["fedsoda"]["step_flops"] < 1


def test_client_threads_take_the_env_then_the_idle_cores(monkeypatch):
    from fedsoda import training

    monkeypatch.setenv("FEDSODA_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert training.client_threads() == 3
    monkeypatch.delenv("FEDSODA_THREADS")
    assert training.client_threads() == 5  # Ray sets this for a simulated client
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(training.os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert training.client_threads() == 1  # 4 cores, 2.6 busy: round(1.4)
    monkeypatch.setattr(training.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert training.client_threads() == 1  # never fewer than one
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert training.client_threads() == 4
