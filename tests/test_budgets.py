"""Memory budgets: the affine memory model, its calibration, the analytic fallback, the spec.

Expected numbers are worked out by hand below each case; the calibration test on the tiny
model measures a third peak in its own fresh process and compares it with the prediction.
"""

import subprocess

import pytest
from transformers import AutoConfig

from fedsoda import accounting, budgets
from fedsoda.budgets import (
    MemoryModel,
    analytic,
    budgets_from_spec,
    calibrate,
    default_sizes,
    measure_peak,
    spread_layers,
)

MiB = 1 << 20


def test_layers_for_is_the_largest_k_whose_peak_fits():
    model = MemoryModel(a=200 * MiB, b=50 * MiB, source="analytic")
    assert model.peak(4) == 400 * MiB
    assert model.layers_for(449 * MiB, 30) == 4  # 400 fits, 450 does not
    assert model.layers_for(450 * MiB, 30) == 5  # exactly at the peak fits
    assert model.layers_for(250 * MiB, 30) == 1
    assert model.layers_for(10_000 * MiB, 30) == 30  # never more than the model has


def test_a_budget_under_one_layer_names_the_smallest_that_works():
    model = MemoryModel(a=200 * MiB, b=50 * MiB, source="analytic")
    with pytest.raises(ValueError, match=r"249\.0 MiB .*smallest budget that works is 250\.0 MiB"):
        model.layers_for(249 * MiB, 30)
    # 100.05 MiB for one layer: the figure is rounded up, so the stated budget works
    odd = MemoryModel(a=50 * MiB, b=50 * MiB + MiB // 20, source="analytic")
    with pytest.raises(ValueError, match=r"smallest budget that works is 100\.1 MiB"):
        odd.layers_for(10 * MiB, 30)
    assert odd.layers_for(round(100.1 * MiB), 30) == 1


def test_headroom_keeps_a_share_of_the_peak_free():
    model = MemoryModel(a=200 * MiB, b=50 * MiB, source="measured", headroom=0.05)
    # 4 layers: 400 MiB * 1.05 = 420 MiB; 5 layers: 450 * 1.05 = 472.5 MiB
    assert model.needs(4) == 420 * MiB
    assert model.layers_for(472 * MiB, 30) == 4
    assert model.layers_for(473 * MiB, 30) == 5
    with pytest.raises(ValueError, match=r"smallest budget that works is 262\.5 MiB"):
        model.layers_for(262 * MiB, 30)  # 250 * 1.05
    with pytest.raises(ValueError, match="headroom"):
        MemoryModel(a=1.0, b=1.0, source="measured", headroom=1.0)


def test_a_budget_of_the_calibrated_full_peak_holds_every_layer():
    # Points (6, 231,000,001) and (30, 927,000,017) bytes: b is not a whole number of bytes,
    # yet peak(30) must be the measured full peak exactly, so a 1.0 budget gets all 30.
    p1, p2 = 231_000_001, 927_000_017
    b = (p2 - p1) / 24
    model = MemoryModel(a=p1 - 6 * b, b=b, source="measured", points=((6, p1), (30, p2)))
    assert model.peak(30) == p2 and model.layers_for(p2, 30) == 30
    assert model.layers_for(p2 - 1, 30) == 29
    # With a 5% headroom a prediction of 30 layers needs 973.4 MB, but 30 layers were
    # measured at 927.0 MB: a budget of that measurement holds them; a byte less gets the
    # prediction's answer, the most k with (a + b k) * 1.05 <= p2 - 1 (b = 29.0 MB, a = 57.0
    # MB): k = 28 (869.0 MB * 1.05 = 912.5 MB; 29: 898.0 MB * 1.05 = 942.9 MB > 927 MB).
    guarded = MemoryModel(a=p1 - 6 * b, b=b, source="measured", points=((6, p1), (30, p2)),
                          headroom=0.05)
    assert guarded.layers_for(p2, 30) == 30
    assert guarded.layers_for(p2 - 1, 30) == 28


def test_a_non_positive_slope_or_an_unknown_source_is_refused():
    with pytest.raises(ValueError, match="positive per-layer cost"):
        MemoryModel(a=100.0, b=-1.0, source="measured", points=((2, 102), (6, 98)))
    with pytest.raises(ValueError, match="source"):
        MemoryModel(a=100.0, b=1.0, source="guessed")


def test_spread_layers_takes_the_middle_of_equal_spans():
    assert spread_layers(6, 30) == [2, 7, 12, 17, 22, 27]
    assert spread_layers(1, 30) == [15]
    assert spread_layers(30, 30) == list(range(30))
    assert spread_layers(3, 10) == [1, 5, 8]  # spans 0-3.3, 3.3-6.7, 6.7-10
    with pytest.raises(ValueError):
        spread_layers(31, 30)
    assert default_sizes(30) == (6, 30)
    assert default_sizes(10) == (2, 10)
    assert default_sizes(4) == (1, 4)
    with pytest.raises(ValueError, match="two layer counts"):
        default_sizes(1)


def test_calibrate_fits_a_line_through_two_dry_runs(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 30}')
    seen = []

    def fake_probe(folder, task, batch_size, max_tokens, data_dir, layers):
        seen.append(list(layers))
        return {2: 300 * MiB, 6: 500 * MiB}[len(layers)]

    monkeypatch.setattr(budgets, "client_peak_memory", fake_probe)
    model = calibrate(tmp_path, "sst2", 8, 256, None, sizes=(6, 2))
    # (500 - 300) / (6 - 2) = 50 MiB per layer; 300 - 2 * 50 = 200 MiB
    assert (model.a, model.b) == (200 * MiB, 50 * MiB)
    assert model.source == "measured" and model.points == ((2, 300 * MiB), (6, 500 * MiB))
    assert seen == [[7, 22], [2, 7, 12, 17, 22, 27]]


def test_analytic_figures_of_the_tiny_llama_config():
    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=10, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True)
    model = analytic(config, batch_size=4, seq_len=16, answer_tokens=1)
    # One layer: q 32x32, k and v 32x16 (2 kv heads of 8), o 32x32, gate/up/down 32x64,
    # two norms of 32: 9,280 weights. LoRA r=8, (in + out) * 8 per projection:
    # q 512, k 384, v 384, o 512, gate 768, up 768, down 768 = 4,096 parameters.
    # Saved per token: bf16 2 * (6*32 + 2*16 + 4*64) = 960 bytes, fp32 LoRA inputs
    # 4 * (6*32 + 64) = 1,024; 64 tokens * 1,984 + S x S bf16 probabilities 2*4*4*16*16 = 8,192.
    assert model.b == 2 * 9280 + 20 * 4096 + 64 * 1984 + 8192 == 235_648
    # Outside the stack: embedding 96x32 (tied head) + final norm 32 = 3,104 bf16 weights;
    # embedding output 2 * 64 * 32; logits at one answer token per example 10 * 4 * 96.
    assert model.a == 2 * 3104 + 2 * 64 * 32 + 10 * 4 * 96 == 14_144
    assert model.source == "analytic"
    every_token = analytic(config, batch_size=4, seq_len=16)  # the safe default: all labelled
    assert every_token.a == 14_144 + 10 * 4 * 15 * 96 and every_token.b == model.b


def test_budgets_from_a_spec_in_client_order():
    assert budgets_from_spec("0.25x4,0.5x4,1.0x2", 10, full_peak=1000) == \
        [250] * 4 + [500] * 4 + [1000] * 2
    assert budgets_from_spec("200MiBx4,400MiBx6", 10) == [200 * MiB] * 4 + [400 * MiB] * 6
    assert budgets_from_spec("1GiB, 0.5 x 2, 512kib", 4, full_peak=3000) == \
        [1 << 30, 1500, 1500, 512 * 1024]
    assert budgets_from_spec("", 3, full_peak=7) == [7, 7, 7]


@pytest.mark.parametrize(("spec", "clients", "message"), [
    ("0.25x4,0.5x4", 10, "budgets list 8 clients, the run has clients=10"),
    ("0.25y4", 4, "'0.25y4' is not BUDGETxCOUNT"),
    ("200MBx4", 4, "'200MBx4' is not BUDGETxCOUNT"),
    ("0x4", 4, "'0x4' needs a positive budget"),
    ("-0.5x4", 4, "'-0.5x4' needs a positive budget"),
    ("0.5x0", 0, "'0.5x0' needs a positive budget and at least one client"),
])
def test_a_bad_spec_is_a_one_line_error(spec, clients, message):
    with pytest.raises(ValueError, match=message) as caught:
        budgets_from_spec(spec, clients, full_peak=1000)
    assert "\n" not in str(caught.value)


def test_fractions_need_the_full_model_peak():
    with pytest.raises(ValueError, match="fraction of the full-model peak"):
        budgets_from_spec("0.5x2", 2)


@pytest.mark.slow
def test_calibration_on_the_tiny_model_predicts_a_third_measured_peak(tiny_probe_setup):
    # Prepare: the tiny model (10 layers) as a layered folder; one thread per probe process.
    folder, settings = tiny_probe_setup
    # Execute: dry runs at 2 and 9 layers fit the model; 5 layers is measured on its own.
    memory = calibrate(folder, sizes=(2, 9), **settings)
    measured = measure_peak(folder, 5, **settings)
    # Assert: one layer costs about 5 MB here (batch 32) on a ~70 MB peak, and CPU peak RSS
    # moves by a megabyte or two between runs of the same step (three repeats before this
    # test was written: predictions within 1.5%), so the stated tolerance is 10% of the peak.
    assert memory.source == "measured" and memory.b > 0
    assert abs(memory.peak(5) - measured) <= 0.10 * measured, (memory, measured)
    (k2, peak2) = memory.points[1]
    assert memory.layers_for(peak2 + 1024, 10) >= k2
    assert memory.layers_for(round(1.10 * measured), 10) >= 5


def test_memory_probes_run_with_the_allocator_pinned_and_timing_probes_do_not(monkeypatch):
    # glibc's adaptive mmap threshold makes peak RSS depend on the allocator's history
    # (fedsoda.accounting's docstring); the memory probes pin it, the timing probe must not.
    seen = []

    def fake_run(command, capture_output, text, check, env):
        seen.append((command[2], env))
        return subprocess.CompletedProcess(command, 0, '{"peak_bytes": 5, "seconds": 1}\n', "")

    monkeypatch.setattr(accounting.subprocess, "run", fake_run)
    monkeypatch.setenv("FEDSODA_MARK", "kept")
    assert accounting.client_peak_memory("F", "sst2", 8, 64, None, layers=[0, 2]) == 5
    assert accounting.similarity_peak_memory("F", "sst2", 16, 64, None) == 5
    monkeypatch.setattr("fedsoda.surgery.layered.folder_num_layers", lambda folder: 4)
    accounting.depth_cost("F", "sst2", 8, 64, None, depth=2)
    (probe, memory), (_, similarity), (_, timing) = seen
    assert probe == "fedsoda.accounting"
    for env in (memory, similarity):
        assert env["MALLOC_MMAP_THRESHOLD_"] == "131072" == env["MALLOC_TRIM_THRESHOLD_"]
        assert env["FEDSODA_MARK"] == "kept"  # the rest of the environment goes along
    assert timing is None  # inherits this process's environment unchanged


def test_calibrate_blocks_measures_each_kind_at_two_scales(tmp_path, monkeypatch):
    # A 10-layer model whose blocks cost 4 (attention) and 6 (MLP) MiB over 100 MiB, but
    # whose whole layers cost 8 MiB, less than their blocks apart (as SmolLM2's do).
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 10}')
    seen = []

    def fake_probe(folder, task, batch_size, max_tokens, data_dir, layers, blocks):
        seen.append((list(layers), blocks[0]))
        per = {"attn+mlp": 8, "mlp": 6, "attn": 4}[blocks[0]]
        return (100 + per * len(layers)) * MiB

    monkeypatch.setattr(budgets, "client_peak_memory", fake_probe)
    model = budgets.calibrate_blocks(tmp_path, "sst2", 8, 256, None)
    assert seen == [(list(range(10)), "attn+mlp"), ([2, 7], "mlp"), (list(range(10)), "mlp"),
                    ([2, 7], "attn"), (list(range(10)), "attn")]
    assert (model.a, model.b_attn, model.b_mlp) == (100 * MiB, 4 * MiB, 6 * MiB)
    assert model.points[0] == (10, 10, 180 * MiB)  # the full-model peak budgets refer to
    # Whole layers are over-predicted, the safe side: 5 of them a + 5 (4 + 6) = 150 MiB
    # against 100 + 5 * 8 = 140 MiB measured.
    assert model.needs(5, 5) == 150 * MiB
