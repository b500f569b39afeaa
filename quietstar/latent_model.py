"""What every latent-reasoning method shares: a wrapped Hugging Face causal LM.

A method (Quiet-STaR now, Coconut later) subclasses ``LatentReasoningModel``,
adds its own modules in ``__init__`` and defines ``forward``. This base class
checks that the base model is one we support, and saves/loads the whole thing:

    <dir>/config.json, model.safetensors   the base LM, as ``save_pretrained`` writes it
    <dir>/tokenizer*                       the tokenizer
    <dir>/<method>_config.json             {"method", "format_version", "tokenizer_class", "config"}
    <dir>/<method>_modules.safetensors     the method's own weights (everything outside ``lm``)

The base weights are a stock Hugging Face checkpoint, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads them with no patched class.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from quietstar.thought_attention import base_attention

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED_ATTENTION = ("eager", "sdpa")
FORMAT_VERSION = 2  # 2: the mixing head has configurable depth and a bias-free last layer


def check_base_model(lm: PreTrainedModel, tokenizer) -> None:
    """Fail with one clear line if ``lm``/``tokenizer`` cannot be wrapped."""
    family = getattr(lm.config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"unsupported model family {family!r} ({type(lm).__name__}); supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    attention = base_attention(lm)
    if attention not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {attention!r} cannot take the thought attention mask; "
            f"load the model with attn_implementation='sdpa' or 'eager'"
        )
    if getattr(lm.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"{type(lm).__name__} has an LM head with a bias; the mixing head needs a bias-free head")
    rows = lm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows"
        )


class LatentReasoningModel(nn.Module):
    """A base causal LM plus a method's own modules. Subclasses set ``method`` and ``config_class``."""

    method: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, base_model: PreTrainedModel, tokenizer, config) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        check_base_model(base_model, tokenizer)
        self.lm = base_model
        self.tokenizer = tokenizer
        self.config = config

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own weights: every entry of the state dict outside the base LM."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("lm.")}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.method_state_dict().items()}
        save_file(tensors, directory / f"{self.method}_modules.safetensors")
        meta = {
            "method": self.method,
            "format_version": FORMAT_VERSION,
            "tokenizer_class": type(self.tokenizer).__name__,
            "config": dataclasses.asdict(self.config),
        }
        (directory / f"{self.method}_config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | str = "auto", device: torch.device | str | None = None
    ) -> "LatentReasoningModel":
        """Load a directory written by ``save_pretrained``."""
        directory = Path(directory)
        meta_path = directory / f"{cls.method}_config.json"
        weights_path = directory / f"{cls.method}_modules.safetensors"
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {directory} is not a saved {cls.__name__}")
        meta = json.loads(meta_path.read_text())
        if meta.get("method") != cls.method or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: expected method {cls.method!r} format {FORMAT_VERSION}, "
                f"got {meta.get('method')!r} format {meta.get('format_version')!r}"
            )
        lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
        if device is not None:
            lm.to(device)
        # Reload the tokenizer class that was saved: AutoTokenizer may pick another one from the model type.
        tokenizer_class = getattr(transformers, meta.get("tokenizer_class", ""), AutoTokenizer)
        tokenizer = tokenizer_class.from_pretrained(directory)
        model = cls(lm, tokenizer, cls.config_class(**meta["config"]))
        own = load_file(weights_path, device=str(lm.device))
        missing = set(model.method_state_dict()) - set(own)
        unexpected = set(own) - set(model.method_state_dict())
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        model.load_state_dict(own, strict=False)
        return model
