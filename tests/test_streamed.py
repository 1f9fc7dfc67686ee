"""Probing a layered model one layer at a time equals probing the whole model."""

import torch

from conftest import random_batches, tiny_model
from fedsoda.surgery.cka import probe_layers
from fedsoda.surgery.layered import load_layered, save_layered
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
