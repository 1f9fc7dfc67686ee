"""FedSODA's whole client-model path for every supported family (Llama, Qwen2, Mistral,
Gemma-3 text), on tiny random models: SGP plan, sub-LLM build with the per-layer config lists
kept in step, NF4 + LoRA with a gradient on every trainable tensor, one alignment step,
plug-back into the full model, PEFT export read back by ``PeftModel.from_pretrained``, and
``generate()`` on the sub-LLM. Each family's own code paths (Gemma-3's scaled embeddings and
sliding/full layer types, Mistral's sliding window, Qwen2's attention biases) run here."""

import copy

import pytest
import torch
from peft import PeftModel

from conftest import FAMILY_CONFIGS, random_batches, tiny_model
from fedsoda.align.oda import align, cache_teacher, measure
from fedsoda.align.settings import AlignSettings
from fedsoda.surgery.build import make_sub_llm
from fedsoda.surgery.lora import load_lora_state, lora_state, set_trainable
from fedsoda.surgery.plan import PruneSettings
from fedsoda.surgery.plugback import export_peft, plug_adapter
from fedsoda.surgery.similarity import similarity_plan

LAYERS = 10
SETTINGS = PruneSettings(n=2, p=2, adapter_layers=2, samples=3, seq_len=12)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core CPU they only wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def nonzero_lora(model, layers, seed: int) -> None:
    """LoRA B is zero at initialisation, which makes every A gradient zero: draw both."""
    generator = torch.Generator().manual_seed(seed)
    state = lora_state(model, layers)
    load_lora_state(model, {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items()})


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_fedsoda_client_model_path(family, tmp_path):
    full = tiny_model(family, layers=LAYERS)
    batches = random_batches(2)
    with torch.inference_mode():
        plan = similarity_plan(full, batches, SETTINGS, f"tiny-{family}")
    assert plan.sub_num_layers == LAYERS - SETTINGS.n * SETTINGS.p
    assert all(b - a == SETTINGS.n for a, b in plan.groups)

    sub = make_sub_llm(full, plan, tmp_path / "sub", quantization="nf4")
    config = sub.model.get_base_model().config
    assert config.num_hidden_layers == plan.sub_num_layers
    if getattr(full.config, "layer_types", None):  # Gemma-3 / Mistral: per-layer lists
        assert config.layer_types == [full.config.layer_types[i] for i in plan.kept_layers]
    quantized = [m for m in sub.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "the client model must hold NF4 weights"

    # Every trainable tensor (emulator and adapter LoRA) gets a non-zero gradient through NF4.
    layers = sub.emulator_layers + sub.adapter_layers
    nonzero_lora(sub.model, layers, seed=1)
    params = set_trainable(sub.model, layers)
    batch = batches[0]
    loss = sub.model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    set_trainable(sub.model, [])

    # One alignment step moves the emulator LoRA and leaves the adapter LoRA alone.
    cache = cache_teacher(full, plan, batches[:1])
    before_emulator, before_adapter = sub.emulator_lora(), sub.adapter_lora()
    result = align(full, sub.model, plan, cache, AlignSettings(lr=1e-2), epochs=1)
    assert result["steps"] == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in measure(full, sub.model, plan, cache).values())
    assert any(not torch.equal(before_emulator[k], v) for k, v in sub.emulator_lora().items())
    assert all(torch.equal(before_adapter[k], v) for k, v in sub.adapter_lora().items())

    # Plug-back: the adapter LoRA lands on the full model's last layers; PEFT reads it back.
    plugged = plug_adapter(copy.deepcopy(full), sub.adapter_lora(), plan, sub.spec)
    export_peft(plugged, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(family, layers=LAYERS), tmp_path / "adapter").eval()
    with torch.no_grad():
        got, expected = loaded(**batch).logits, plugged(**batch).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert not torch.allclose(got, full(**batch).logits), "the plugged LoRA had no effect"

    prompt = batch["input_ids"][:1, :6]
    with torch.no_grad():
        out = sub.model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out[:, :6], prompt)


def test_default_pruning_refused_on_an_18_layer_model_with_settings_that_fit():
    """Gemma-3 270M has 18 layers: the default 4 windows of 4 do not fit its 15 emulator
    layers (4 x 4 = 16 > 18 - 3); the error names p <= 3."""
    with pytest.raises(ValueError, match=r"with n=3 use p <= 3"):
        PruneSettings().check_model(18)
    PruneSettings(p=3).check_model(18)
