"""Probing a layered model one layer at a time equals probing the whole model."""

import json

import torch

from conftest import random_batches, tiny_model
from fedsoda.surgery.cka import probe_layers
from fedsoda.surgery.layered import folder_num_layers, layered_folder, load_layered, save_layered
from fedsoda.surgery.lora import LoraSpec, attach_lora, load_lora_state, lora_state
from fedsoda.surgery.streamed import streamed_probe


def test_one_layer_at_a_time_gives_the_whole_models_outputs_and_influence(tmp_path):
    save_layered(tiny_model(layers=6), tmp_path)
    # The reference: all six layers at once, from the same (bf16-stored) weights, in fp32,
    # with a non-zero global LoRA on layers 1 and 4 (B = 0 elsewhere).
    whole = attach_lora(load_layered(tmp_path, range(6), dtype=torch.float32), list(range(6)))
    generator = torch.Generator().manual_seed(3)
    lora = {k: 0.3 * torch.randn(v.shape, generator=generator)
            for k, v in lora_state(whole, [1, 4]).items()}
    zero_b = {k: torch.zeros_like(v) for k, v in lora_state(whole, [0, 2, 3, 5]).items()
              if "lora_B" in k}
    load_lora_state(whole, {**lora, **zero_b})
    batches = random_batches(count=2, batch=3, seq=12)
    expected = probe_layers(whole, batches, max_tokens=None)
    got = streamed_probe(tmp_path, 6, batches, lora=lora, spec=LoraSpec(), max_tokens=None)
    assert got.tokens == expected.tokens == 2 * (3 * 12 - 4 - 3)  # padding and first tokens out
    for a, b in zip(got.outputs, expected.outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got.influence), torch.tensor(expected.influence),
                               rtol=1e-5, atol=1e-7)
    # The LoRA mattered: without it, layers 1 and 4 compute something else.
    plain = streamed_probe(tmp_path, 6, batches, max_tokens=None)
    assert not torch.allclose(plain.outputs[1], expected.outputs[1], atol=1e-4)


def test_the_token_cap_keeps_the_rows_the_whole_model_probe_keeps(tmp_path):
    save_layered(tiny_model(layers=3), tmp_path)
    whole = load_layered(tmp_path, range(3), dtype=torch.float32)
    batches = random_batches(count=2, batch=3, seq=12)  # 58 chosen tokens, capped at 20
    expected = probe_layers(whole, batches, max_tokens=20, seed=5)
    got, units = streamed_probe(tmp_path, 3, batches, max_tokens=20, seed=5, units=True)
    assert got.tokens == expected.tokens == 58
    for a, b, mlp in zip(got.outputs, expected.outputs, units.mlp_outputs, strict=True):
        assert a.shape == (20, b.shape[1]) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.equal(mlp, a)
    assert all(x.shape[0] == 20 for x in units.attn_outputs)
    # The influence is still over every chosen token, not only the kept rows.
    torch.testing.assert_close(torch.tensor(got.influence), torch.tensor(expected.influence),
                               rtol=1e-5, atol=1e-7)


def test_bfloat16_rows_are_the_float32_rows_rounded_and_keep_cka(tmp_path):
    from fedsoda.surgery.cka import cka_matrix

    save_layered(tiny_model(layers=4), tmp_path)
    batches = random_batches(count=2, batch=3, seq=12)
    full = streamed_probe(tmp_path, 4, batches, max_tokens=20, seed=5)
    half, units = streamed_probe(tmp_path, 4, batches, max_tokens=20, seed=5, units=True,
                                 dtype=torch.bfloat16)
    for a, b, attn in zip(full.outputs, half.outputs, units.attn_outputs, strict=True):
        assert b.dtype == attn.dtype == torch.bfloat16
        assert torch.equal(b, a.to(torch.bfloat16))  # the same rows, only rounded
    assert half.influence == full.influence  # measured before any rounding
    # bf16 keeps 8 significand bits (relative error <= 2^-9 per entry), so CKA moves by
    # about that much; 0.01 is ~5x that bound and still far below a grouping decision.
    difference = (cka_matrix(half.outputs) - cka_matrix(full.outputs)).abs().max()
    assert 0 < difference < 0.01


def test_unit_outputs_are_the_stream_after_attention_and_after_the_mlp(tmp_path):
    from fedsoda.models import decoder_layers
    from fedsoda.surgery.cka import token_mask

    save_layered(tiny_model(layers=3), tmp_path)
    whole = load_layered(tmp_path, range(3), dtype=torch.float32)
    batches = random_batches(count=1, batch=3, seq=12)
    layers = decoder_layers(whole)
    attn_out = {}
    for i, layer in enumerate(layers):  # what attn(norm(h)) gives inside the whole model
        layer.self_attn.register_forward_hook(lambda m, a, o, i=i: attn_out.__setitem__(i, o[0]))
    with torch.no_grad():
        states = whole(**batches[0], output_hidden_states=True, use_cache=False).hidden_states
    mask = token_mask(batches[0]["attention_mask"], True)
    layer_probe, units = streamed_probe(tmp_path, 3, batches, max_tokens=None, units=True)
    assert layer_probe.tokens == int(mask.sum())
    plain = streamed_probe(tmp_path, 3, batches, max_tokens=None)  # units leave layers as they were
    for a, b in zip(plain.outputs, layer_probe.outputs, strict=True):
        assert torch.equal(a, b)
    for i, layer in enumerate(layers):
        h = states[i]
        middle = h + attn_out[i]  # by hand: h + attn(norm(h))
        torch.testing.assert_close(units.attn_outputs[i], middle[mask].float(), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            after = middle + layer.mlp(layer.post_attention_layernorm(middle))
        torch.testing.assert_close(units.mlp_outputs[i], after[mask].float(), rtol=1e-5, atol=1e-5)
        cos = torch.nn.functional.cosine_similarity
        expected = float((1 - cos(h[mask].double(), middle[mask].double(), dim=-1)).mean())
        assert abs(units.attn_influence[i] - expected) < 1e-5
    assert len(units.mlp_influence) == 3 and min(units.mlp_influence) > 0


def test_lora_shapes_from_a_layer_file_match_the_lora_peft_attaches(tmp_path):
    from fedsoda.surgery.layered import folder_num_layers, lora_shapes

    save_layered(tiny_model(layers=4), tmp_path)
    assert folder_num_layers(tmp_path) == 4
    spec = LoraSpec()
    attached = lora_state(attach_lora(load_layered(tmp_path, range(4)), [2], spec), [2])
    expected = {name: tuple(t.shape) for name, t in attached.items()}
    assert lora_shapes(tmp_path, 2, spec.r, spec.targets) == expected
    assert len(expected) == 2 * len(spec.targets)  # A and B of every target projection


def test_layered_folder_uses_a_given_folder_or_writes_the_model_layered(tiny_model_dir, tmp_path):
    assert layered_folder("unused", tmp_path, given=tmp_path / "mine") == tmp_path / "mine"
    written = layered_folder(str(tiny_model_dir), tmp_path)
    layers = json.loads((tiny_model_dir / "config.json").read_text())["num_hidden_layers"]
    assert written == tmp_path / "layered" and folder_num_layers(written) == layers
    assert len(list(written.glob("layer-*.safetensors"))) == layers
